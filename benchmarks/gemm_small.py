"""Micro-benchmark of `kernels.gemm_small` (x [M, K] @ W.T for M <= 64 rows of x, fp32) against torch's
F.linear (MKL sgemm) on the shapes of a DeepSeek-V2-Lite routed expert in prefill: gate_up (N=2816, K=2048) and
down (N=2048, K=1408), M tokens routed to the expert. With --experts E > 1 each call takes the next of E weight
matrices, so that (as in a real prefill, which walks 64 experts) weights come from memory rather than cache.

    python benchmarks/gemm_small.py
    python benchmarks/gemm_small.py --threads 2 --experts 4
"""
import argparse

import torch
import torch.nn.functional as F

from dsinfer import kernels
from timing import best_seconds_per_call

SHAPES = [(2816, 2048), (2048, 1408)]  # N, K


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ms", type=int, nargs="+", default=[16, 32, 48, 64])
    ap.add_argument("--experts", type=int, default=1, help="weight matrices cycled through, one per call")
    ap.add_argument("--seconds", type=float, default=0.3, help="length of one measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.library() is None:
        raise SystemExit("the CPU kernels cannot be built on this machine")
    print(f"threads={torch.get_num_threads()} experts={args.experts}")
    print(f"{'M':>3} {'N':>5} {'K':>5} {'kernel GF/s':>11} {'torch GF/s':>10} {'kernel/torch':>12} {'max err':>8}")
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        ws = [torch.randn(n, k, generator=g) * k ** -0.5 for _ in range(args.experts)]
        for m in args.ms:
            x = torch.randn(m, k, generator=g)
            flops = 2 * m * n * k
            with torch.inference_mode():
                kern = flops / seconds(lambda w: kernels.gemm_small(x, w), ws, args.seconds) / 1e9
                plain = flops / seconds(lambda w: F.linear(x, w), ws, args.seconds) / 1e9
                err = (kernels.gemm_small(x, ws[0]) - F.linear(x, ws[0])).abs().max()
            print(f"{m:>3} {n:>5} {k:>5} {kern:>11.1f} {plain:>10.1f} {kern / plain:>12.2f} {float(err):>8.1e}")


def seconds(fn, ws, min_seconds: float) -> float:
    """Seconds per call of fn(w), cycling through the weights ws."""
    state = {"i": 0}

    def step():
        fn(ws[state["i"] % len(ws)])
        state["i"] += 1
    return best_seconds_per_call(step, min_seconds, 3)


if __name__ == "__main__":
    main()
