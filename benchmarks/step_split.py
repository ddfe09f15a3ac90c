"""How much of a decode step is the engine's own CPU work (scheduling, input preparation, sampling, output
processing) rather than the forward pass: what overlapping that work with the model could hide at best.

    python benchmarks/step_split.py MODEL [MODEL ...]   # e.g. ../peers-bench/models/tiny-v3
"""
import argparse
import time

import torch

from dsinfer import LLM, SamplingParams


def measure(llm: LLM, streams: int, steps: int) -> tuple[float, float]:
    """(seconds per step, of which in the forward pass) over `steps` decode steps of `streams` requests."""
    engine, spent = llm.engine, [0.0]
    run = engine.runner.run

    def timed(batch, want):
        start = time.perf_counter()
        out = run(batch, want)
        spent[0] += time.perf_counter() - start
        return out
    rids = llm.add_requests([{"prompt_token_ids": list(range(5, 133))}] * streams,
                            SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
    engine.step(), engine.step()  # the prefill, then a first decode
    engine.runner.run = timed
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - start
    engine.runner.run = run
    for rid in rids:
        engine.abort(rid)
    return total / steps, spent[0] / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.models:
        llm = LLM(path, max_model_len=1024, enable_prefix_caching=False)
        for streams in (1, 8):
            step, forward = measure(llm, streams, args.steps)
            print(f"{path}: {streams} streams: step {step * 1e3:.3f} ms, forward {forward * 1e3:.3f} ms, "
                  f"engine's own work {(step - forward) * 1e3:.3f} ms ({(step - forward) / step:.1%})")


if __name__ == "__main__":
    main()
