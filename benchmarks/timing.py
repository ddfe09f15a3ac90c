"""Timing for the kernel benchmarks: the best of several short measurements, which filters out other load on
the machine."""
import time


def best_seconds_per_call(fn, min_seconds: float, repeat: int) -> float:
    fn()  # warm-up: builds the kernels, fills caches
    best = float("inf")
    for _ in range(repeat):
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < min_seconds:
            fn()
            calls += 1
        best = min(best, (time.perf_counter() - start) / calls)
    return best
