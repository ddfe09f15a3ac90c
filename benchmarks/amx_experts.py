"""Micro-benchmark of a bf16 prefill's routed experts (Experts.stacked) on dsinfer's AMX kernel
(KernelConfig.amx_experts, grouped_mm_amx.c) against torch._grouped_mm, which it replaces, on DeepSeek-V2-Lite's
shapes (64 experts, D=2048, I=1408, 6 per token). Each call runs on a fresh layer's weights out of several, so
that the weights come from memory as in a model (all layers' experts are far larger than the cache).

    python benchmarks/amx_experts.py [--tokens 512] [--layers 4]
"""
import argparse
import itertools

import torch

from dsinfer import kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers.moe import Experts
from timing import best_seconds_per_call


def layer(g: torch.Generator) -> Experts:
    ex = Experts(64, 2048, 1408, KernelConfig().resolve("cpu"))
    torch.nn.init.normal_(ex.gate_up_proj, std=0.02, generator=g)
    torch.nn.init.normal_(ex.down_proj, std=0.02, generator=g)
    return ex.to(torch.bfloat16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4, help="layers' weights cycled through (4: 4.4 GB)")
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    if not kernels.amx_ready():
        raise SystemExit("this CPU (or OS) offers no AMX-BF16 tiles: nothing to compare")
    g = torch.Generator().manual_seed(0)
    layers = [layer(g) for _ in range(a.layers)]
    x = torch.randn(a.tokens, 2048, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(64, generator=g)[:6] for _ in range(a.tokens)])
    weights = torch.rand(a.tokens, 6, generator=g)
    times = {}
    for amx in (True, False):
        for ex in layers:
            ex.amx = amx
        turn = itertools.cycle(layers)
        times[amx] = best_seconds_per_call(lambda: next(turn)(x, weights, ids), a.seconds, 3)
    gb = 3 * 64 * 1408 * 2048 * 2 / 1e9
    for amx, label in ((False, "torch._grouped_mm"), (True, "AMX kernel")):
        print(f"{label:18s} {times[amx] * 1e3:8.2f} ms per layer ({gb / times[amx]:5.1f} GB/s of weights)")
    print(f"AMX kernel: {times[False] / times[True]:.2f}x")


if __name__ == "__main__":
    main()
