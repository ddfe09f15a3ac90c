"""`dsinfer bench` itself: loads the model, runs dsinfer's figures (and transformers' with --compare), prints the
table, and writes --json and --plot."""
import sys

import torch

from dsinfer.tools.bench import engine, hf, measure, plot, report
from dsinfer.tools.bench.progress import Progress, phase_count


def load(args, options: dict):
    """options: what every model-loading command takes from its flags (dtype, device, cache format...)."""
    from dsinfer import LLM
    return LLM(args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
               enable_chunked_prefill=not args.no_chunked_prefill, **options)


def settings(args, llm) -> dict:
    """The command's arguments, with what `auto` and the defaults resolved to."""
    from dsinfer import default_model_path
    resolved = {"model": str(args.model or default_model_path()), "dtype": str(llm.dtype).removeprefix("torch."),
                "device": str(llm.device), "threads": torch.get_num_threads(), "max_model_len": llm.max_model_len,
                "kv_cache_dtype": llm.kv_cache_dtype, "kernels": llm.kernel_config.describe()}
    return {k: v for k, v in vars(args).items() if k != "command"} | resolved


def header(s: dict) -> str:
    return (f"dsinfer bench: {s['model']}, {s['dtype']}, {s['device']}, {s['threads']} threads, "
            f"{s['num_requests']} requests, input {tuple(s['input_len'])}, output {tuple(s['output_len'])}, "
            f"concurrency {s['concurrency']}\nkernels: {s['kernels']}; cache: {s['kv_cache_dtype']}")


def measure_all(args, options: dict, progress: Progress) -> tuple[dict, dict, dict]:
    """(settings, dsinfer's figures, transformers' figures or {}); dsinfer's model is freed before
    transformers loads its own."""
    with progress.phase("dsinfer: loading, warming up"):
        llm = load(args, options)
        w = measure.workload(args, llm.model.config.vocab_size, llm.max_model_len)
        engine.warm_up(llm, w)
    s = settings(args, llm)
    progress.write(header(s))
    ours = engine.run(llm, w, progress)
    dtype = llm.dtype
    del llm
    peer = hf.run(s["model"], dtype, w, progress) if args.compare else {}
    return s, ours, peer


def run(args, options: dict):
    if args.plot:
        plot.require()
    if args.compare:
        hf.require()
    if args.threads:
        torch.set_num_threads(args.threads)
    enabled = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = Progress(phase_count(bool(args.compare)), enabled)
    try:
        s, ours, peer = measure_all(args, options, progress)
    finally:
        progress.close()
    report.print_report(ours, peer)
    rec = report.record(s, ours, peer)
    if args.json:
        report.write_json(args.json, rec)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot.draw(args.plot, rec)
        print(f"wrote {args.plot}")
