"""dsinfer behind the shared peer-benchmark protocol (../shared/bench/harness.py: prefill / decode by token ids).

    cd ../peers-bench && .venv/bin/python harness.py --engine peer_engine:Engine --model models/v2lite-4L \
        --dtype fp32   # with PYTHONPATH=<dsinfer checkout>/benchmarks

--dtype int8 or int4 quantizes the weights on load (decode rounds activations to int8 in blocks of 32 unless
DSINFER_INT8_ACTIVATIONS=0); a GPTQ checkpoint loads as it is.
"""
import torch

from dsinfer import LLM, SamplingParams


class Engine:
    def __init__(self, model, dtype="fp32", threads=2, max_batch=8, max_ctx=1024, **extra):
        torch.set_num_threads(threads)
        quantization = dtype if dtype in ("int8", "int4") else None
        dtype = "float32" if quantization else dtype
        # 512 tokens per step, as the harness gives llama.cpp n_ubatch=512: the 512-token prefill is one step,
        # 8 x 128 prompts take two. No prefix caching: the protocol times whole prefills, uncached.
        self.llm = LLM(model, dtype={"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype), quantization=quantization,
                       max_model_len=max_ctx, max_num_seqs=max_batch, max_num_batched_tokens=max(512, max_batch),
                       enable_prefix_caching=False, **extra)
        self.engine = self.llm.engine
        self.vocab_size = self.llm.model.config.vocab_size
        self.rids = []

    def prefill(self, ids: list[list[int]]) -> list[int]:
        for rid in self.rids:
            self.engine.abort(rid)
        sp = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
        self.rids = self.llm.add_requests([{"prompt_token_ids": p} for p in ids], sp)
        first = {}
        while len(first) < len(self.rids):  # prompts longer than one step's budget take several steps
            first.update({o.request_id: o.outputs[0].token_ids[-1] for o in self.engine.step() if o.outputs[0].token_ids})
        return [first[r] for r in self.rids]

    def decode(self, ids: list[int]) -> list[int]:
        return self.step()  # the engine feeds back its own greedy tokens, which are these ids

    def step(self) -> list[int]:
        outs = {o.request_id: o for o in self.engine.step()}
        return [outs[r].outputs[0].token_ids[-1] for r in self.rids]

    def info(self):
        return {"engine": "dsinfer", "torch": torch.__version__, "threads": torch.get_num_threads()}
