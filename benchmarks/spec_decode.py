"""Speculative decoding with the MTP layer: decode tokens/s at 1 and at N streams for each number of drafted
tokens k (0: no speculation), and the acceptance, in one run. Greedy, on Python code the built-in model was not
trained on (windows of tqdm's sources, a dependency of dsinfer), so that acceptance is that of unseen code.

    python benchmarks/spec_decode.py [--model DIR] [--ks 0,1,2,3] [--streams 8] [--tokens 128] [--rounds 3]
        [--variant DSINFER_SWITCH=0 ...]

1 stream: requests one after another, tokens/s between each one's first and last token (decode only), summed
over requests; also the mean time of an engine step there and the tokens it emits (the best round's), whose
ratio to k = 0 is the cost of a speculative step. N streams: N requests at once, all generated tokens over the wall time (their prefills included).
Each k is measured once per round, rounds interleaved, and its best round is reported. Acceptance counts every
request of every round. --variant (repeatable): another set of engines built with these environment variables
(kernel switches are read when an engine is built), measured in the same rounds, for an A/B in one sitting.
"""
import argparse
import contextlib
import inspect
import os
import time

import torch
import tqdm.std
import tqdm.utils

from dsinfer import LLM, SamplingParams


def code_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens from tqdm's sources, at evenly spaced offsets."""
    ids = tokenizer.encode(inspect.getsource(tqdm.std) + inspect.getsource(tqdm.utils))
    step = (len(ids) - length) // count
    return [ids[i * step:i * step + length] for i in range(count)]


def one_stream(llm, prompts, params) -> tuple[float, float, float]:
    """Decode tokens/s, ms per engine step and tokens per step, between each request's first and last token."""
    tokens, seconds, steps = 0, 0.0, 0
    for p in prompts:
        stamps, n = [], 0
        for out in llm.stream({"prompt_token_ids": p}, params):
            stamps.append(time.perf_counter())
            n = len(out.outputs[0].token_ids)
        first_tokens = 1  # the first output carries the prefill's token (and, with speculation, maybe no more)
        tokens, seconds, steps = tokens + n - first_tokens, seconds + stamps[-1] - stamps[0], steps + len(stamps) - 1
    return tokens / seconds, 1000 * seconds / steps, tokens / steps


def many_streams(llm, prompts, params) -> float:
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def switch(text: str) -> tuple[str, bool]:
    """--switch NAME=on|off: an EngineConfig switch for the speculative runs."""
    name, _, value = text.partition("=")
    if value not in ("on", "off"):
        raise SystemExit(f"--switch takes NAME=on or NAME=off, got {text!r}")
    return name, value == "on"


def load(args, k: int):
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    if spec and args.disable_by_batch_size:
        spec["disable_by_batch_size"] = args.disable_by_batch_size
    quantization = None if args.draft_quantization == "none" else args.draft_quantization
    extra = {"spec_draft_quantization": quantization, **dict(map(switch, args.switch))} if k else {}
    llm = LLM(args.model, max_model_len=1024, speculative_config=spec, dtype=args.dtype, **extra)
    many_streams(llm, code_prompts(llm.get_tokenizer(), 2, 32), SamplingParams(temperature=0, max_tokens=8))
    return llm


def measure(llm, args) -> tuple[tuple[float, float, float], float]:
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    prompts = code_prompts(llm.get_tokenizer(), args.streams, args.prompt_len)
    return one_stream(llm, prompts[:args.single], params), many_streams(llm, prompts, params)


@contextlib.contextmanager
def environment(assignments: str):
    """NAME=VALUE[,NAME=VALUE...] set while the block runs ('' sets nothing)."""
    pairs = [a.split("=", 1) for a in assignments.split(",") if a]
    saved = {name: os.environ.get(name) for name, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def run(args) -> dict[str, dict[int, dict]]:
    """Every (variant, k) measured once per round, rounds interleaved; the best round of each (other work on the
    machine only ever slows a round down)."""
    llms = {}
    for variant in args.variant:
        with environment(variant):
            llms.update({(variant, k): load(args, k) for k in map(int, args.ks.split(","))})
    best = {key: dict(one=0.0, many=0.0, step_ms=0.0, per_step=0.0) for key in llms}
    for _ in range(args.rounds):
        for key, llm in llms.items():
            (one, step_ms, per_step), many = measure(llm, args)
            if one > best[key]["one"]:
                best[key].update(one=one, step_ms=step_ms, per_step=per_step)
            best[key]["many"] = max(best[key]["many"], many)
    for key, llm in llms.items():
        stats = llm.engine.stats()
        best[key].update(acceptance=[round(r, 3) for r in stats.spec_acceptance_rate],
                         length=round(stats.spec_mean_accepted_length, 3))
    return {v: {k: r for (variant, k), r in best.items() if variant == v} for v in args.variant}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--ks", default="0,1,2,3", help="numbers of drafted tokens, 0 = no speculation")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--single", type=int, default=4, help="requests in the 1-stream figure")
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is its best round")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CPUs with AMX or AVX512-BF16), float32, ...")
    ap.add_argument("--draft-quantization", default="auto",
                    help="spec_draft_quantization (k > 0): auto (the engine's default), int8, int4 or none")
    ap.add_argument("--disable-by-batch-size", type=int, default=None,
                    help="speculative_config's disable_by_batch_size: no drafts while more sequences run")
    ap.add_argument("--switch", action="append", default=[], metavar="NAME=on|off",
                    help="an EngineConfig switch for k > 0, e.g. spec_draft_one_call=off (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE[,...]",
                    help="environment for another set of engines beside the environment as it is, e.g. "
                         "DSINFER_BF16_PAIRS=0 (repeatable)")
    args = ap.parse_args()
    args.variant = [""] + args.variant
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    print(f"torch threads: {torch.get_num_threads()}, dtype: {args.dtype}, "
          f"draft quantization: {args.draft_quantization}, disable_by_batch_size: {args.disable_by_batch_size}, "
          f"switches: {args.switch or '-'}")
    for variant, rows in results.items():
        report(variant, rows, args.streams)
    first = results[args.variant[0]]
    for variant in args.variant[1:]:
        print(f"{variant or 'as is'} against {args.variant[0] or 'as is'}, 1 stream tok/s: " + ", ".join(
            f"k = {k} {r['one'] / first[k]['one']:.3f}x" for k, r in results[variant].items()))


def report(variant: str, rows: dict[int, dict], streams: int):
    base = rows.get(0)
    print(f"\nenvironment: {variant or 'as is'}")
    print(f"| k | 1 stream tok/s | x | ms per step | x | tokens per step | {streams} streams tok/s | x | "
          "acceptance per position | mean accepted length |\n|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for k, r in rows.items():
        x1, xs, xn = ((r[f] / base[f] if base else float("nan")) for f in ("one", "step_ms", "many"))
        print(f"| {k} | {r['one']:.1f} | {x1:.2f} | {r['step_ms']:.3f} | {xs:.2f} | {r['per_step']:.2f} | "
              f"{r['many']:.1f} | {xn:.2f} | {r['acceptance'] or '-'} | {r['length'] or '-'} |")


if __name__ == "__main__":
    main()
