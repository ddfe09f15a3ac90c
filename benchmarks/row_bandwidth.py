"""Read bandwidth of the decode kernels from memory: `kernels.gemv` over DeepSeek-V2-Lite's LM head [102400,
2048] (two heads alternating in bf16, so that they do not fit a large L3) and `kernels.moe_decode` over its
routed experts (64 x 3 x [1408, 2048]) with fresh random choices each call, fp32 and bf16, for 1 and 2 rows of x
(or the ROWS given).
The bf16 row kernel's prefetch of the next rows is a build switch; compare with it off by building the kernels
apart:

    python benchmarks/row_bandwidth.py [THREADS] [ROWS, e.g. 1,2,3]
    CC="cc -DROW_PREFETCH=0" DSINFER_CACHE=/tmp/nopf python benchmarks/row_bandwidth.py
"""
import sys
import time

import torch

from dsinfer import kernels
torch.manual_seed(0)


def median_call(fn, calls: int) -> tuple[float, int]:
    """(median seconds, bytes) of fn(i) for i = 1..calls, after fn(0); fn returns the weight bytes it read."""
    fn(0)
    times, nbytes = [], 0
    for i in range(calls):
        start = time.perf_counter()
        nbytes = fn(i + 1)
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2], nbytes


def heads(dtype: torch.dtype, ms: list[int]):
    ws = [torch.randn(102400, 2048).to(dtype) for _ in range(2 if dtype == torch.bfloat16 else 1)]
    for m in ms:
        x = torch.randn(m, 2048)
        yield f"LM head, {m} row(s)", lambda i, x=x: kernels.gemv(x, ws[i % len(ws)]).numel() * 0 + ws[0].numel() * ws[0].element_size()


def experts(dtype: torch.dtype, ms: list[int], e: int = 64, d: int = 2048, inter: int = 1408, k: int = 6):
    gate_up, down = torch.randn(e, 2 * inter, d).to(dtype), torch.randn(e, d, inter).to(dtype)
    for m in ms:
        x, weights = torch.randn(m, d), torch.rand(m, k)

        def call(i, m=m, x=x, weights=weights):
            ids = torch.stack([torch.randperm(e)[:k] for _ in range(m)])
            kernels.moe_decode(x, ids, weights, gate_up, down)
            return ids.unique().numel() * 3 * inter * d * gate_up.element_size()
        yield f"routed experts, {m} token(s)", call


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    ms = [int(m) for m in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 2]
    for dtype in (torch.float32, torch.bfloat16):
        for make, calls in ((heads, 20), (experts, 60)):
            for label, fn in make(dtype, ms):
                seconds, nbytes = median_call(fn, calls)
                print(f"{str(dtype)[6:]:9s} {label:26s} {seconds * 1e3:7.2f} ms  {nbytes / seconds / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
