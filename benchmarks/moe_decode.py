"""Micro-benchmark of the routed experts of a DeepSeekMoE layer at decode on CPU: dsinfer's fused
`kernels.moe_decode` (one C call, one parallel region, what `Experts.forward` runs for decode batches) against
`Experts.grouped` (a loop over active experts, each a gather, two `linear`s through the gemv kernel, silu * up
and an index_add; prefill's path, and decode's before the kernel). Each of T
tokens picks K distinct random experts.

    python benchmarks/moe_decode.py
    python benchmarks/moe_decode.py --dtypes fp32 bf16 --threads 2
"""
import argparse

import torch

from dsinfer import kernels
from dsinfer.kernels import KernelConfig
from timing import best_seconds_per_call
from dsinfer.layers.moe import Experts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = [(8, 256, 224, 2, 1), (64, 2048, 1408, 6, 1), (64, 2048, 1408, 6, 8)]  # E, D, I, K, T


def us_per_call(fn, min_seconds: float = 0.3, repeat: int = 3) -> float:
    return best_seconds_per_call(fn, min_seconds, repeat) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if kernels.library() is None:
        raise SystemExit("the CPU kernels cannot be built on this machine")
    print(f"threads={torch.get_num_threads()}")
    print(f"{'dtype':>5} {'E':>3} {'D':>5} {'I':>5} {'K':>2} {'T':>2} {'experts':>7} {'kernel us':>10} "
          f"{'grouped us':>10} {'grouped/kernel':>14} {'max err':>8}")
    g = torch.Generator().manual_seed(0)
    for name in args.dtypes:
        for shape in SHAPES:
            print(measure(name, *shape, g))


def measure(name: str, e: int, d: int, inter: int, k: int, t: int, g: torch.Generator) -> str:
    """One table row: the kernel against Experts.grouped (one matmul per expert) on the same random weights."""
    experts = Experts(e, d, inter, KernelConfig()).requires_grad_(False)
    for p, fan_in in ((experts.gate_up_proj, d), (experts.down_proj, inter)):
        p.data = p.data.uniform_(-fan_in ** -0.5, fan_in ** -0.5, generator=g).to(DTYPES[name])
    x = torch.randn(t, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
    with torch.inference_mode():
        kernel = us_per_call(lambda: kernels.moe_decode(x, ids, weights, gate_up, down))
        plain = us_per_call(lambda: experts.grouped(x, weights, ids))
        err = (kernels.moe_decode(x, ids, weights, gate_up, down) - experts.grouped(x, weights, ids)).abs().max()
    return (f"{name:>5} {e:>3} {d:>5} {inter:>5} {k:>2} {t:>2} {ids.unique().numel():>7} {kernel:>10.1f} "
            f"{plain:>10.1f} {plain / kernel:>14.2f} {float(err):>8.1e}")

if __name__ == "__main__":
    main()
