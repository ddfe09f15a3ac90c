"""Quality of the training-free sparse attention (sparse_attention={sink, window, topk_blocks}) on the built-in
model: held-out perplexity, top-1 agreement with dense attention and mean KL(dense || sparse), at settings that
keep 1/4 and 1/8 of a full context's keys, with fp32 weights.

    python benchmarks/sparse_quality.py [--model DIR] [--eval-tokens 32768] [--length 256]

Held-out text: the standard-library files the built-in model never trained on (the trainer's split), cut into
sequences of --length tokens: 256 is the length the built-in model was trained on. Each sequence is scored in
one prefill, in which every query attends to the keys the sparse mode keeps for it (as decode would)."""
import argparse
import time

from quant_quality import compare, eval_sequences

from dsinfer import LLM
from dsinfer.engine.model_runner import score
from dsinfer.layers.block_sparse import SparseConfig

BLOCK = 16
SETTINGS = {  # the fraction is of the keys kept at the last position of a 256-token context
    "1/4: sink 16, window 16, 2 blocks": dict(sink=16, window=16, topk_blocks=2),
    "1/4: window 32, 2 blocks": dict(sink=0, window=32, topk_blocks=2),
    "1/4: sink 16, window 48 (no blocks)": dict(sink=16, window=48, topk_blocks=0),
    "1/8: window 16, 1 block": dict(sink=0, window=16, topk_blocks=1),
    "1/8: sink 16, window 16 (no blocks)": dict(sink=16, window=16, topk_blocks=0),
}


def kept(sp: SparseConfig, p: int) -> int:
    """Keys a query at position p keeps at most (sinks, window, chosen blocks' middle positions; fewer where a
    chosen block straddles the sinks or the window)."""
    middle = max(0, p - sp.window + 1 - sp.sink)
    return min(p + 1, min(sp.sink, p + 1) + min(sp.window, p + 1) + min(middle, sp.topk_blocks * BLOCK))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--length", type=int, default=256)
    args = p.parse_args()
    dense = LLM(args.model, dtype="float32")
    seqs = eval_sequences(dense.tokenizer, args.eval_tokens, args.length)
    ref = [score(dense.model, s).float().log_softmax(-1) for s in seqs]
    base = compare(ref, ref, seqs)
    print(f"dense: ppl {base['ppl']:.3f}; {sum(map(len, seqs)):,} held-out tokens in {len(seqs)} sequences of "
          f"{args.length}\n")
    print("| setting | keys kept at the last position | mean kept over positions | perplexity | vs dense "
          "| top-1 agreement | mean KL |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, d in SETTINGS.items():
        t0, sp = time.time(), SparseConfig.from_dict(d)
        llm = LLM(args.model, dtype="float32", sparse_attention=d)
        r = compare(ref, [score(llm.model, s).float().log_softmax(-1) for s in seqs], seqs)
        last = kept(sp, args.length - 1) / args.length
        mean = sum(kept(sp, q) / (q + 1) for q in range(args.length)) / args.length
        print(f"| {name} | {last:.3f} | {mean:.3f} | {r['ppl']:.3f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% "
              f"| {100 * r['top1']:.2f}% | {r['kl']:.4f} |  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
