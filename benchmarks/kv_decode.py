"""Decode speed at one stream with each latent-cache format, at long contexts (a smaller cache row is less to
read per token):

    python benchmarks/kv_decode.py --model DIR [--contexts 2048 16384] [--tokens 32]

Per cache dtype: one engine, one prompt per context, then --tokens greedy tokens; tokens per second from the
median gap between tokens (a stray pause of the machine does not move it)."""
import argparse
import statistics
import time

import torch

from dsinfer import LLM, SamplingParams


def decode_rate(llm: LLM, context: int, tokens: int) -> float:
    g = torch.Generator().manual_seed(context)
    prompt = {"prompt_token_ids": torch.randint(3, llm.model.config.vocab_size, (context,), generator=g).tolist()}
    stamps = [time.perf_counter() for _ in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=tokens,
                                                                              ignore_eos=True))]
    return 1 / statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "fp8"])
    args = p.parse_args()
    longest = max(args.contexts) + args.tokens + 16
    print("| cache dtype | bytes / token | " + " | ".join(f"decode tok/s at {c}" for c in args.contexts) + " |")
    print("|---|---:|" + "---:|" * len(args.contexts))
    for kv in args.dtypes:
        llm = LLM(args.model, kv_cache_dtype=kv, max_model_len=longest, max_num_seqs=1, enable_prefix_caching=False)
        rates = [decode_rate(llm, c, args.tokens) for c in args.contexts]
        print(f"| {kv} | {llm.engine.cache.bytes_per_token} | " + " | ".join(f"{r:.2f}" for r in rates) + " |",
              flush=True)
        del llm


if __name__ == "__main__":
    main()
