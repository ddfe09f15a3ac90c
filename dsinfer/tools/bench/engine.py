"""dsinfer's bench figures, driving requests through the public LLM API (add_requests, step, has_unfinished)."""
import time
from collections import deque
from dataclasses import dataclass

from dsinfer.sampling_params import SamplingParams
from dsinfer.tools.bench import measure
from dsinfer.tools.bench.measure import Tick, Workload, no_tick


def fixed(max_tokens: int) -> SamplingParams:
    """Greedy and exactly max_tokens long, so that every run does the same work."""
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@dataclass(slots=True)
class Timing:
    submitted: float
    first: float = 0.0  # 0: no token yet
    finished: float = 0.0
    tokens: int = 0


def run_requests(llm, requests, concurrency: int, tick: Tick = no_tick) -> list[Timing]:
    """Keeps up to `concurrency` requests in flight, submitting the next as one finishes; returns when each
    request was submitted, got its first token and finished."""
    pending, live, done = deque(requests), {}, []
    while pending or llm.has_unfinished():
        while pending and len(live) < concurrency:
            prompt, max_tokens = pending.popleft()
            (rid,) = llm.add_requests([{"prompt_token_ids": prompt}], fixed(max_tokens))
            live[rid] = Timing(time.perf_counter())
        for out in llm.step():
            now, t = time.perf_counter(), live[out.request_id]
            t.first = t.first or now
            if out.finished:
                t.finished, t.tokens = now, len(out.outputs[0].token_ids)
                done.append(live.pop(out.request_id))
                tick(1)
    return done


def throughput(llm, w: Workload, tick: Tick = no_tick) -> dict:
    """All requests submitted at once; the engine batches them as it likes."""
    start = time.perf_counter()
    done = run_requests(llm, w.requests, len(w.requests), tick)
    return measure.rates(w.requests, sum(t.tokens for t in done), time.perf_counter() - start)


def latency(llm, w: Workload, tick: Tick = no_tick) -> dict:
    """w.concurrency requests in flight; TTFT is submission to first token, TPOT the mean gap after it."""
    done = run_requests(llm, w.requests, w.concurrency, tick)
    ttft = [t.first - t.submitted for t in done]
    tpot = [(t.finished - t.first) / (t.tokens - 1) for t in done if t.tokens > 1]
    return {**measure.percentiles("TTFT ms", ttft), **measure.percentiles("TPOT ms", tpot)}


def decode_one_stream(llm, w: Workload, tick: Tick = no_tick) -> dict:
    figures = {}
    for context in w.contexts:
        prompt = measure.seeded_prompt(context, w.vocab)
        stamps, counts = [], []  # an output brings several tokens with speculative decoding
        for out in llm.stream({"prompt_token_ids": prompt}, fixed(w.decode_tokens)):
            stamps.append(time.perf_counter())
            counts.append(len(out.outputs[0].token_ids))
        figures |= measure.decode_figures(context, stamps, counts)
        tick(1)
    return figures


def first_token(llm, ids: list[int]):
    return next(iter(llm.stream({"prompt_token_ids": ids}, fixed(1))))


def warm_up(llm, w: Workload):
    run_requests(llm, [(measure.warm_up_prompt(w), 2)], 1)


def run(llm, w: Workload, progress) -> dict[str, dict]:
    """Every figure, section by section; progress.phase(name, total) gives each phase its tick."""
    names = measure.section_names(w)
    sizes = (len(w.requests), len(w.requests), len(w.contexts), 2)
    steps = (throughput, latency, decode_one_stream,
             lambda llm, w, tick: measure.prefix_ttft(lambda ids: first_token(llm, ids), w, tick))
    result = {}
    for name, size, step in zip(names, sizes, steps):
        with progress.phase(f"dsinfer: {name}", size) as tick:
            result[name] = step(llm, w, tick)
    stats = llm.stats()
    if stats.spec_draft_tokens:
        result["speculative decoding"] = spec_figures(stats)
    return result


def spec_figures(stats) -> dict:
    """Acceptance over the whole run (warm-up included), by draft position, and tokens per verify step."""
    figures = {f"acceptance rate, position {i}": r for i, r in enumerate(stats.spec_acceptance_rate, 1)}
    return figures | {"mean accepted length": stats.spec_mean_accepted_length}
