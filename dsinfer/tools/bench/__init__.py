"""`dsinfer bench`: dsinfer's throughput, latency percentiles, single-stream decode speed and prefix-cache time
to first token, optionally side by side with Hugging Face transformers' generate on the same model and prompts.

measure: the workload and the measurements both engines share; engine: dsinfer's run (through the public LLM
API); hf: transformers' run; report: the table, the JSON record and the machine; plot: the PNG chart;
progress: the progress bars; command: the command itself."""
