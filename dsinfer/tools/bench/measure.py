"""What dsinfer's and transformers' runs share: the workload (the same requests and prompts for both) and the
figures computed from time stamps, so that both sides are measured the same way."""
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tick = Callable[[int], object]  # advances a progress bar by n; measurements call it as requests finish


def no_tick(n: int = 1):
    return None


@dataclass(slots=True)
class Workload:
    requests: list[tuple[list[int], int]]  # (prompt token ids, tokens to generate), in submission order
    concurrency: int  # requests in flight for the latency figures (the batch size for transformers)
    contexts: tuple[int, int]  # prompt lengths of the two single-stream decode figures
    decode_tokens: int
    prefix_len: int  # the shared prefix of the prefix-cache figure
    vocab: int


def workload(args, vocab: int, max_model_len: int) -> Workload:
    """The prefix is cut to leave room for the decode figure's tokens within max_model_len."""
    requests = random_requests(args.num_requests, args.input_len, args.output_len, vocab, args.seed)
    prefix = max(1, min(args.prefix_len, max_model_len - max(32, args.decode_tokens)))
    return Workload(requests, args.concurrency, (args.input_len[0], prefix), args.decode_tokens, prefix, vocab)


def random_requests(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    return [(random_prompt(draw(*input_len), vocab, g), draw(*output_len)) for _ in range(n)]


def random_prompt(length: int, vocab: int, g: torch.Generator) -> list[int]:
    """Token ids from 3 up (0..2 are the special tokens of the built-in model)."""
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def seeded_prompt(length: int, vocab: int, seed: int = 1) -> list[int]:
    return random_prompt(length, vocab, torch.Generator().manual_seed(seed))


def warm_up_prompt(w: Workload) -> list[int]:
    """A request run before measuring, so that first-call costs (kernel builds, allocations) stay out of the
    figures; its tokens are none of the workload's, so it warms no prefix cache for them."""
    return seeded_prompt(16, w.vocab, seed=3)


def rates(requests, out_tokens: int, secs: float) -> dict:
    in_tokens = sum(len(p) for p, _ in requests)
    return {"requests/s": len(requests) / secs, "output tok/s": out_tokens / secs,
            "total tok/s": (in_tokens + out_tokens) / secs}


def percentiles(name: str, values: list[float]) -> dict:
    """p50, p90, p99 in milliseconds of values in seconds."""
    if len(values) < 2:
        return {f"{name} p50": values[0] * 1e3} if values else {}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {f"{name} p50": q[49] * 1e3, f"{name} p90": q[89] * 1e3, f"{name} p99": q[98] * 1e3}


def decode_figures(context: int, stamps: list[float], counts: list[int] | None = None) -> dict:
    """Tokens per second after the first output of one stream, from the time stamps of its outputs and its token
    count at each (None: one token each; with speculative decoding an output brings several): the mean, and from
    the median time per token of a step, which a stray pause of the machine does not move."""
    counts = counts or list(range(1, len(stamps) + 1))
    steps = [(b - a, m - n) for a, b, n, m in zip(stamps, stamps[1:], counts, counts[1:])]
    per_token = [gap / new for gap, new in steps if new > 0]
    if not per_token:
        return {}
    label = f"(1 stream, {context}-token context)"
    return {f"decode tok/s {label}": (counts[-1] - counts[0]) / (stamps[-1] - stamps[0]),
            f"decode tok/s, median gap {label}": 1 / statistics.median(per_token)}


def prefix_ttft(first_token: Callable[[list[int]], object], w: Workload, tick: Tick = no_tick) -> dict:
    """Two requests sharing a w.prefix_len-token prefix, each run to its first token by first_token(ids); an
    engine with a prefix cache finds the prefix there the second time."""
    g = torch.Generator().manual_seed(2)
    prefix = random_prompt(w.prefix_len, w.vocab, g)
    result = {}
    for label in ("cold", "warm"):
        tail = random_prompt(16, w.vocab, g)
        start = time.perf_counter()
        first_token(prefix + tail)
        result[f"prefix TTFT ms ({label})"] = (time.perf_counter() - start) * 1e3
        tick(1)
    result["warm/cold"] = result["prefix TTFT ms (warm)"] / result["prefix TTFT ms (cold)"]
    return result


def section_names(w: Workload) -> tuple[str, str, str, str]:
    return "throughput", "latency", "single stream", f"prefix cache ({w.prefix_len} tokens)"
