"""`dsinfer bench`: offline throughput, latency percentiles, single-stream decode and prefix-cache time to
first token, optionally side by side with Hugging Face transformers' generate on the same model and prompts."""
import statistics
import time

import torch

from dsinfer.sampling_params import SamplingParams


def random_requests(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    reqs = []
    for _ in range(n):
        prompt = torch.randint(3, vocab, (draw(*input_len),), generator=g).tolist()
        reqs.append((prompt, draw(*output_len)))
    return reqs


def fixed(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def throughput(llm, reqs) -> dict:
    """All requests submitted at once; the engine batches them as it likes."""
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in reqs], [fixed(m) for _, m in reqs], use_tqdm=False)
    secs = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p, _ in reqs)
    return {"requests/s": len(reqs) / secs, "output tok/s": out_tokens / secs,
            "total tok/s": (in_tokens + out_tokens) / secs}


def latency(llm, reqs, concurrency: int) -> dict:
    """Keeps `concurrency` requests in flight; TTFT is submission to first token, TPOT the mean gap after it."""
    engine, pending, live, ttft, tpot = llm.engine, list(reqs), {}, [], []
    while pending or live:
        while pending and len(live) < concurrency:
            prompt, max_tokens = pending.pop(0)
            (rid,) = llm.add_requests([{"prompt_token_ids": prompt}], fixed(max_tokens))
            live[rid] = [time.perf_counter(), None]
        for out in engine.step():
            now, times = time.perf_counter(), live[out.request_id]
            if times[1] is None:
                times[1] = now
                ttft.append(now - times[0])
            if out.finished:
                n = len(out.outputs[0].token_ids)
                if n > 1:
                    tpot.append((now - times[1]) / (n - 1))
                del live[out.request_id]
    return {**percentiles("TTFT ms", ttft), **percentiles("TPOT ms", tpot)}


def percentiles(name: str, values: list[float]) -> dict:
    if len(values) < 2:
        return {f"{name} p50": values[0] * 1e3} if values else {}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {f"{name} p50": q[49] * 1e3, f"{name} p90": q[89] * 1e3, f"{name} p99": q[98] * 1e3}


def decode_one_stream(llm, prompt_len: int, tokens: int, vocab: int) -> dict:
    """Tokens per second after the first token: the mean, as transformers' figure is taken, and from the median
    gap between tokens, which a stray pause of the machine does not move."""
    prompt = torch.randint(3, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    stamps = [time.perf_counter() for _ in llm.stream({"prompt_token_ids": prompt}, fixed(tokens))]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    label = f"(1 stream, {prompt_len}-token context)"
    return {f"decode tok/s {label}": len(gaps) / sum(gaps),
            f"decode tok/s, median gap {label}": 1 / statistics.median(gaps)}


def prefix_ttft(first_token, prefix_len: int, vocab: int) -> dict:
    """Two requests sharing a prefix_len-token prefix, each run to its first token by first_token(ids); an
    engine with a prefix cache finds the prefix there the second time."""
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=g).tolist()
    result = {}
    for label in ("cold", "warm"):
        tail = torch.randint(3, vocab, (16,), generator=g).tolist()
        start = time.perf_counter()
        first_token(prefix + tail)
        result[f"prefix TTFT ms ({label})"] = (time.perf_counter() - start) * 1e3
    result["warm/cold"] = result["prefix TTFT ms (warm)"] / result["prefix TTFT ms (cold)"]
    return result


def run(llm, args) -> dict[str, dict]:
    vocab = llm.model.config.vocab_size
    reqs = random_requests(args.num_requests, args.input_len, args.output_len, vocab, args.seed)
    prefix = min(args.prefix_len, llm.max_model_len - 32)
    return {"throughput": throughput(llm, reqs), "latency": latency(llm, reqs, args.concurrency),
            "single stream": {**decode_one_stream(llm, args.input_len[0], args.decode_tokens, vocab),
                              **decode_one_stream(llm, prefix, args.decode_tokens, vocab)},
            f"prefix cache ({prefix} tokens)": prefix_ttft(
                lambda ids: next(iter(llm.stream({"prompt_token_ids": ids}, fixed(1)))), prefix, vocab),
            "_vocab": vocab, "_max_model_len": llm.max_model_len}
