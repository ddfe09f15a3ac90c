"""Micro-benchmark of dsinfer's decode matmul kernels on CPU: fp32 `kernels.gemv` against `kernels.qgemv` on
int8 (per-channel) and int4 (groups of 128) weights, with and without mins, and torch's own int8 kernel.
Kinds ending in "x8" run qgemv's int8-activation path (x quantized to int8 in blocks of 32, integer dot
products; the time includes quantizing x); their last column compares with the same weights' fp32-activation
path in the same run.

    python benchmarks/qkernels.py                 # all shapes, M in 1 2 4 8, torch's thread count
    python benchmarks/qkernels.py --shapes 10944x2048 --m 1 8 --threads 2
    python benchmarks/qkernels.py --shapes 2816x2048 2048x1408 102400x2048 --m 1 8 --kinds int8 "int8 x8" int4 "int4 x8"

Each kernel walks over enough copies of its weights (--min-mib, 256 MiB by default) that they stream from
memory rather than cache. GB/s counts the weight bytes a call reads: codes plus scales (and mins).
"""
import argparse
import time

import torch

from dsinfer import kernels


def random_weights(kind: str, n: int, k: int) -> dict:
    if kind == "fp32":
        return {"w": torch.randn(n, k)}
    bits, g = (8, k) if kind.startswith("int8") else (4, 128)
    kind = kind.removesuffix(" x8")
    ng = -(-k // g)
    q = torch.randint(-128, 128, (n, k if bits == 8 else k // 2), dtype=torch.int8)
    return {"q": q if bits == 8 else q.view(torch.uint8), "scales": torch.rand(n, ng) / 64,
            "mins": torch.randn(n, ng) / 64 if kind.endswith("mins") else None, "bits": bits, "group_size": g}


def weight_bytes(w: dict) -> int:
    return sum(t.numel() * t.element_size() for t in w.values() if isinstance(t, torch.Tensor))


def call(kind: str, x: torch.Tensor, w: dict):
    if kind == "fp32":
        return kernels.gemv(x, w["w"])
    if kind.startswith("aten"):
        return torch.ops.aten._weight_int8pack_mm(x, w["q"], w["s"])
    return kernels.qgemv(x, w["q"], w["scales"], w["mins"], w["bits"], w["group_size"],
                         int8_activations=kind.endswith("x8"))


def seconds_per_call(kind: str, x: torch.Tensor, copies: list, min_seconds: float, repeat: int) -> float:
    """The best of `repeat` measurements of at least min_seconds each (the best filters out other load)."""
    for w in copies:  # warm up (and fault in) every copy once
        call(kind, x, w)
    best = float("inf")
    for _ in range(repeat):
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < min_seconds:
            for w in copies:
                call(kind, x, w)
            calls += len(copies)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def copies_of(kind: str, n: int, k: int, min_bytes: int) -> list:
    if kind.startswith("aten"):
        dtype = torch.bfloat16 if "bf16" in kind else torch.float32
        one = {"q": torch.randint(-128, 128, (n, k), dtype=torch.int8), "s": (torch.rand(n) / 64).to(dtype)}
    else:
        one = random_weights(kind, n, k)
    count = max(1, -(-min_bytes // weight_bytes(one)))
    return [one] + [{key: t.clone() if isinstance(t, torch.Tensor) else t for key, t in one.items()}
                    for _ in range(count - 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["1408x2048", "10944x2048", "102400x2048", "2048x1408"],
                    help="N x K of the weight (output rows x input columns)")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8], help="rows of x")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--min-mib", type=int, default=256, help="weight copies to rotate over, in MiB per kernel")
    ap.add_argument("--seconds", type=float, default=0.1, help="minimum time per measurement")
    ap.add_argument("--repeat", type=int, default=5, help="measurements per entry; the best is shown")
    ap.add_argument("--no-aten", action="store_true", help="skip torch's _weight_int8pack_mm")
    ap.add_argument("--kinds", nargs="+", help="only these kernels (fp32, int8, int4 x8, ...; fp32 is the base)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.library() is None:
        raise SystemExit("dsinfer's CPU kernels cannot be built here")
    kinds = ["fp32", "int8", "int8 x8", "int4", "int4 x8", "int8+mins", "int8+mins x8", "int4+mins", "int4+mins x8"]
    extra = [] if args.no_aten else ["aten int8 fp32-x", "aten int8 bf16-x"]
    if args.kinds:
        kinds, extra = [kind for kind in kinds + extra if kind in args.kinds or kind == "fp32"], []
    print(f"threads {args.threads}; weights rotate over >= {args.min_mib} MiB per kernel; "
          "GB/s = weight bytes read per call (codes + scales + mins) / time")
    fp32_us, us = {}, {}
    print(f"{'N x K':>12} {'M':>2} {'kernel':>17} {'us':>9} {'GB/s':>6} {'x fp32':>7} {'x fp32-x':>8}")
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        for kind in kinds + extra:
            ms = [m for m in args.m if m in (1, 8)] if kind.startswith("aten") else args.m
            try:
                copies = copies_of(kind, n, k, args.min_mib << 20)
            except RuntimeError as exc:
                print(f"{shape:>12}    {kind:>17} unavailable: {exc}")
                continue
            for m in ms:
                x = torch.randn(m, k)
                if kind.endswith("bf16-x"):
                    x = x.bfloat16()
                try:
                    secs = seconds_per_call(kind, x, copies, args.seconds, args.repeat)
                except RuntimeError as exc:
                    print(f"{shape:>12} {m:>2} {kind:>17} unavailable: {str(exc).splitlines()[0]}")
                    break
                gbs = weight_bytes(copies[0]) / secs / 1e9
                base = fp32_us.get((shape, m)) if kind != "fp32" else None
                if kind == "fp32":
                    fp32_us[(shape, m)] = secs * 1e6
                ratio = f"{base / (secs * 1e6):6.2f}x" if base else ""
                us[(shape, m, kind)] = secs * 1e6
                old = us.get((shape, m, kind.removesuffix(" x8"))) if kind.endswith(" x8") else None
                gain = f"{old / (secs * 1e6):6.2f}x" if old else ""
                print(f"{shape:>12} {m:>2} {kind:>17} {secs * 1e6:9.1f} {gbs:6.1f} {ratio:>7} {gain:>8}", flush=True)
            del copies

if __name__ == "__main__":
    main()
