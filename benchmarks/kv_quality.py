"""Quality of the compact latent caches on the built-in model (or any checkpoint with a tokenizer): held-out
perplexity, top-1 agreement with the fp32 cache and mean KL(fp32 cache || compact cache), for kv_cache_dtype
bfloat16 and fp8 (DeepSeek's layout), with fp32 weights.

    python benchmarks/kv_quality.py [--model DIR] [--eval-tokens 32768] [--length 512]

Held-out text: the standard-library files the built-in model never trained on (the trainer's split). Each
sequence is scored in one prefill whose attention reads every key back from the cache in the given format,
as decode does."""
import argparse
import time

from quant_quality import compare, eval_sequences

from dsinfer import LLM
from dsinfer.engine.model_runner import score


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--length", type=int, default=512)
    args = p.parse_args()
    llm = LLM(args.model, dtype="float32")
    seqs = eval_sequences(llm.tokenizer, args.eval_tokens, args.length)
    ref, rows = None, []
    for kv_dtype in ("float32", "bfloat16", "fp8"):
        t0 = time.time()
        lp = [score(llm.model, s, kv_dtype).float().log_softmax(-1) for s in seqs]
        ref = ref or lp
        r = compare(ref, lp, seqs)
        rows.append((kv_dtype, r))
        print(f"{kv_dtype:9} ppl {r['ppl']:8.3f}  top-1 {100 * r['top1']:6.2f}%  KL {r['kl']:.5f}  "
              f"({time.time() - t0:.0f} s)", flush=True)
    print(f"\nheld-out tokens: {sum(len(s) for s in seqs):,}; perplexity relative to the fp32 cache:")
    for name, r in rows:
        print(f"  {name:9} {100 * (r['ppl'] / rows[0][1]['ppl'] - 1):+6.3f}%")


if __name__ == "__main__":
    main()
