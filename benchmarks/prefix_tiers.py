"""The prefix cache's disk tier against memory alone, on a multi-turn chat workload whose conversations do not all
fit the in-memory cache: each turn resends the whole conversation plus a new user message, one request at a
time, the conversations taking turns. Reports the mean time to first token of returning turns (turn 2 on) and
the peak RSS with the disk tier off and on, for each cache dtype; then the TTFT of one max-length prompt whose
prefix is loaded from disk (by a restarted engine) against computing it.

    python benchmarks/prefix_tiers.py                      # the built-in model
    python benchmarks/prefix_tiers.py --model PATH --conversations 8 --turns 5

Each configuration runs in its own process, so that each peak RSS is its own.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsinfer import LLM, SamplingParams
from dsinfer.engine.kv_cache import bytes_per_token
from dsinfer.models.loader import default_model_path, read_config

DTYPES = ("float32", "bfloat16", "fp8")


def model_config(args):
    return read_config(Path(args.model) if args.model else default_model_path())


def options(args, kv: str, directory: str | None, max_model_len: int) -> dict:
    """An in-memory cache of max_model_len tokens (the least the engine takes), and the disk tier in directory."""
    per_token = bytes_per_token(model_config(args), kv)
    return dict(max_model_len=max_model_len, kv_cache_dtype=kv, kv_cache_memory=max_model_len * per_token,
                prefix_cache_dir=directory)


def timed_request(llm: LLM, ids: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """(seconds to the first token, the output's token ids) of one greedy request run alone."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start, first, out = time.perf_counter(), None, None
    llm.add_requests([{"prompt_token_ids": ids}], params)
    while llm.has_unfinished():
        for out in llm.step():
            first = first or time.perf_counter() - start
    return first, out.outputs[0].token_ids


def conversations(args, vocab: int) -> list[list[list[int]]]:
    """Each conversation's user messages, as token ids."""
    g = torch.Generator().manual_seed(args.seed)
    return [[torch.randint(3, vocab, (args.user_tokens,), generator=g).tolist() for _ in range(args.turns)]
            for _ in range(args.conversations)]


def chat_workload(args, kv: str, directory: str | None) -> dict:
    max_len = -(-(args.turns * (args.user_tokens + args.reply_tokens) + 16) // 16) * 16  # whole cache blocks
    llm = LLM(args.model, **options(args, kv, directory, max_len))
    talks = conversations(args, llm.model.config.vocab_size)
    history, first, returning, replies = [[] for _ in talks], [], [], []
    timed_request(llm, talks[0][0][:8], 2)  # warm-up: first-call costs out of the figures
    for turn in range(args.turns):
        for c, talk in enumerate(talks):
            history[c] += talk[turn]
            seconds, reply = timed_request(llm, history[c], args.reply_tokens)
            history[c] += reply
            replies.append(reply)
            (returning if turn else first).append(seconds)
    s = llm.engine.stats()
    return dict(kv=kv, tier=directory is not None, returning_ms=1e3 * sum(returning) / len(returning), first_ms=1e3 * sum(first) /
                len(first), computed=s.prompt_tokens_computed, memory_hits=s.memory_hit_blocks,
                disk_hits=s.disk_hit_blocks, rss_mib=peak_rss_mib(), replies=replies)


def long_prefix(args, kv: str, directory: str) -> dict:
    """TTFT of a --prefix-tokens prompt (default: the model's max length): computed by a fresh engine, then by a
    restarted one that finds its prefix on disk (written at the first engine's close)."""
    cfg = model_config(args)
    n = min(args.prefix_tokens or cfg.max_position_embeddings, cfg.max_position_embeddings) - 1
    ids = torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    kw = options(args, kv, directory, n + 1)
    cold = LLM(args.model, **kw)
    timed_request(cold, ids[:8][::-1], 1)  # warm-up
    computed, out = timed_request(cold, ids, 1)
    cold.close()
    del cold  # one model in memory at a time
    warm = LLM(args.model, **kw)
    timed_request(warm, ids[:8][::-1], 1)
    loaded, again = timed_request(warm, ids, 1)
    return dict(kv=kv, tokens=n, computed_ms=1e3 * computed, loaded_ms=1e3 * loaded, same=out == again,
                disk_hits=warm.engine.stats().disk_hit_blocks)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_job(args, job: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="prefix-tiers-") as directory:
        if job["kind"] == "long":
            return long_prefix(args, job["kv"], directory)
        return chat_workload(args, job["kv"], directory if job["tier"] else None)


def in_process(job: dict) -> dict:
    """Runs one job in a fresh interpreter (its own peak RSS) and returns its figures."""
    cmd = [sys.executable, __file__, "--job", json.dumps(job)] + sys.argv[1:]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"job {job} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_tables(chats: list[dict], longs: list[dict], args):
    if chats:
        print_chats(chats, args)
    print("\n| cache dtype | prompt tokens | TTFT computed (ms) | TTFT prefix from disk (ms) | disk hit blocks | "
          "same token |")
    print("|---|---:|---:|---:|---:|---|")
    for r in longs:
        print(f"| {r['kv']} | {r['tokens']} | {r['computed_ms']:.1f} | {r['loaded_ms']:.1f} | {r['disk_hits']} | "
              f"{r['same']} |")


def print_chats(chats: list[dict], args):
    print(f"{args.conversations} conversations x {args.turns} turns, {args.user_tokens}-token user messages, "
          f"{args.reply_tokens}-token replies; in-memory cache: one conversation's full length")
    print("| cache dtype | disk tier | TTFT returning turns (ms) | TTFT first turns (ms) | prompt tokens computed "
          "| memory hit blocks | disk hit blocks | peak RSS (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in chats:
        print(f"| {r['kv']} | {'on' if r['tier'] else 'off'} | {r['returning_ms']:.2f} | {r['first_ms']:.2f} | "
              f"{r['computed']} | {r['memory_hits']} | {r['disk_hits']} | {r['rss_mib']:.0f} |")
    for kv in DTYPES:
        off, on = (next(r for r in chats if r["kv"] == kv and r["tier"] == t) for t in (False, True))
        print(f"{kv}: replies with the tier on equal those with it off: {off['replies'] == on['replies']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--user-tokens", type=int, default=48)
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefix-tokens", type=int, default=None, help="the long prompt's length (default: the "
                    "model's max_position_embeddings)")
    ap.add_argument("--long-only", action="store_true", help="only the long-prefix figure, not the chat workload")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.job:
        return print(json.dumps(run_job(args, json.loads(args.job))))
    chats = [] if args.long_only else [in_process(dict(kind="chat", kv=kv, tier=t)) for kv in DTYPES
                                       for t in (False, True)]
    longs = [in_process(dict(kind="long", kv=kv)) for kv in DTYPES]
    print_tables(chats, longs, args)


if __name__ == "__main__":
    main()
