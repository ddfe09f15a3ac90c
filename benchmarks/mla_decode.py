"""Micro-benchmark of absorbed MLA decode attention on CPU: dsinfer's `kernels.mla_decode` against the torch path
of MLA.absorbed from the absorbed query on (index_select gather, bmm, masked softmax, bmm). Each of T tokens
attends to its own sequence of `context` cache rows, scattered through the cache.

    python benchmarks/mla_decode.py
    python benchmarks/mla_decode.py --t 1 8 --contexts 32 512 2000 4000 --dtypes fp32 bf16 --threads 2
"""
import argparse

import torch

from dsinfer import kernels
from timing import best_seconds_per_call
from dsinfer.layers.attention import rows as gather_rows

H, R, DR = 16, 512, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def torch_path(qc, cache, gather_index, token_seq, positions, scale, r):
    """MLA.absorbed from qc = cat(q_lat, q_pe) to o_lat."""
    ctx = gather_rows(cache, gather_index).to(qc.dtype)
    if ctx.shape[0] != qc.shape[0]:
        ctx = ctx[token_seq]
    scores = torch.bmm(ctx, qc.transpose(1, 2)).transpose(1, 2).float() * scale
    future = torch.arange(ctx.shape[1])[None, :] > positions[:, None]
    probs = scores.masked_fill(future[:, None, :], float("-inf")).softmax(-1).to(qc.dtype)
    return torch.bmm(probs, ctx[..., :r])


def ms_per_call(fn, min_seconds: float = 0.04, repeat: int = 8) -> float:
    return best_seconds_per_call(fn, min_seconds, repeat) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32, 512, 2000, 4000])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if kernels.library() is None:
        raise SystemExit("the CPU kernel cannot be built on this machine")
    print(f"H={H} R={R} DR={DR} threads={torch.get_num_threads()}")
    print(f"{'cache':>5} {'T':>3} {'context':>7} {'kernel ms':>10} {'torch ms':>9} {'torch/kernel':>12} {'max err':>8}")
    g = torch.Generator().manual_seed(0)
    scale = (128 + DR) ** -0.5
    for name in args.dtypes:
        for t in args.t:
            for context in args.contexts:
                cache = torch.randn(t * context + 100, R + DR, generator=g).to(DTYPES[name])
                q = torch.randn(t, H, R + DR, generator=g)
                index = torch.randperm(cache.shape[0], generator=g)[:t * context].view(t, context)
                seq, lens = torch.arange(t), torch.full((t,), context)
                ours = ms_per_call(lambda: kernels.mla_decode(q, cache, index, seq, lens, scale, R))
                base = ms_per_call(lambda: torch_path(q, cache, index, seq, lens - 1, scale, R))
                err = (kernels.mla_decode(q, cache, index, seq, lens, scale, R)
                       - torch_path(q, cache, index, seq, lens - 1, scale, R)).abs().max().item()
                print(f"{name:>5} {t:>3} {context:>7} {ours:>10.3f} {base:>9.3f} {base / ours:>12.2f} {err:>8.1e}")


if __name__ == "__main__":
    main()
