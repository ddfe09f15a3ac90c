"""Micro-benchmark of `kernels.moe_prefill` (a prefill's MLPs in one call, moe_prefill_avx2.c) against the torch
path it replaces, on DeepSeek-V2-Lite's shapes (D=2048): the routed experts of a 512-token prefill (64 experts of
I=1408, 6 per token; Experts.grouped: gemm_small or MKL per expert) and dense MLPs (MLP.run: MKL), both in fp32.
Routing is skewed like a random router's (experts get 4 to 140 of the 512 tokens) unless --even.

    python benchmarks/moe_prefill.py
    python benchmarks/moe_prefill.py --tokens 256 --even
"""
import argparse

import torch

from dsinfer import kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers.mlp import MLP
from dsinfer.layers.moe import Experts
from timing import best_seconds_per_call


def routed(tokens: int, even: bool, g: torch.Generator):
    ex = Experts(64, 2048, 1408, KernelConfig())  # grouped: the small-GEMM matmuls, as a model binds them
    torch.nn.init.normal_(ex.gate_up_proj, std=0.02, generator=g)
    torch.nn.init.normal_(ex.down_proj, std=0.02, generator=g)
    x = torch.randn(tokens, 2048, generator=g)
    skew = torch.ones(64) if even else torch.linspace(1.6, 0.6, 64)  # uneven expert loads
    ids = (torch.rand(tokens, 64, generator=g) * skew).topk(6, dim=-1).indices
    weights = torch.rand(tokens, 6, generator=g)
    counts = torch.bincount(ids.flatten(), minlength=64)
    label = f"routed experts, {tokens} tokens ({int(counts.min())}-{int(counts.max())} per expert)"
    flops = 2 * 3 * 2048 * 1408 * ids.numel()
    return label, flops, (lambda: ex.grouped(x, weights, ids)), (
        lambda: kernels.moe_prefill(x, ids, weights, ex.gate_up_proj.data, ex.down_proj.data))


def dense(tokens: int, inter: int, g: torch.Generator):
    mlp = MLP(2048, inter, KernelConfig())
    torch.nn.init.normal_(mlp.gate_up_proj, std=0.02, generator=g)
    torch.nn.init.normal_(mlp.down_proj, std=0.02, generator=g)
    x = torch.randn(tokens, 2048, generator=g)
    flops = 2 * 3 * 2048 * inter * tokens
    return f"dense MLP I={inter}, {tokens} tokens", flops, (lambda: mlp.run(x)), (
        lambda: kernels.moe_prefill(x, None, None, mlp.gate_up_proj.data[None], mlp.down_proj.data[None]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--even", action="store_true", help="every expert gets about the same number of tokens")
    ap.add_argument("--seconds", type=float, default=0.5, help="length of one measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.library() is None:
        raise SystemExit("the CPU kernels cannot be built on this machine")
    g = torch.Generator().manual_seed(0)
    cases = [routed(args.tokens, args.even, g), dense(args.tokens, 2816, g), dense(args.tokens, 10944, g)]
    print(f"threads={torch.get_num_threads()}  GFLOP/s, best of 3 alternating measurements")
    for label, flops, plain, fused in cases:
        with torch.inference_mode():
            err = float((plain() - fused()).abs().max())
            times = {"torch": float("inf"), "kernel": float("inf")}
            for _ in range(3):  # alternate, so that a change in the machine's speed hits both
                times["torch"] = min(times["torch"], best_seconds_per_call(plain, args.seconds, 1))
                times["kernel"] = min(times["kernel"], best_seconds_per_call(fused, args.seconds, 1))
        tf, kf = flops / times["torch"] / 1e9, flops / times["kernel"] / 1e9
        print(f"{label:<52} torch {tf:6.1f}  kernel {kf:6.1f}  kernel/torch {kf / tf:5.2f}  max err {err:.1e}")


if __name__ == "__main__":
    main()
