"""Load test for a running `dsinfer serve`, loopback only, bounded in requests and time.

    dsinfer serve &                       # the built-in model on 127.0.0.1:8000
    python benchmarks/load.py --requests 64 --concurrency 8 --max-tokens 32

Prints requests/s, output tokens/s, and time-to-first-token and whole-request latency percentiles.
"""
import argparse
import asyncio
import json
import statistics
import time
from urllib.parse import urlparse

import httpx


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


async def run(args) -> dict:
    body = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    results, sent, deadline = [], 0, time.perf_counter() + args.max_seconds
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=args.max_seconds, headers=headers) as client:
        async def worker():
            nonlocal sent
            while sent < args.requests and time.perf_counter() < deadline:
                sent += 1
                results.append(await one(client, args.url, body))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        secs = time.perf_counter() - start
    return summarize(results, secs)


def summarize(results, secs) -> dict:
    def pct(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3 if len(values) > 1 else values[0] * 1e3
    ttft, total = [r[0] for r in results], [r[1] for r in results]
    return {"requests": len(results), "seconds": secs, "requests/s": len(results) / secs,
            "output tok/s": sum(r[2] for r in results) / secs,
            **{f"TTFT p{q} ms": pct(ttft, q) for q in (50, 90, 99)},
            **{f"latency p{q} ms": pct(total, q) for q in (50, 90, 99)}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="dsinfer-default")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=120)
    args = ap.parse_args()
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("load.py only targets a loopback server")
    for name, value in asyncio.run(run(args)).items():
        print(f"{name:<16}{value:>12.2f}" if isinstance(value, float) else f"{name:<16}{value:>12}")


if __name__ == "__main__":
    main()
