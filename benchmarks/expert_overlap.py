"""How many distinct routed experts a window of consecutive tokens needs, as a speculative verify step of w tokens
reads them, against random pairs of tokens of the same text and against routers that choose uniformly. A verify
step bound by memory bandwidth reads one copy of each distinct expert, so this sets what a second token costs.

    python benchmarks/expert_overlap.py [--model DIR] [--windows 4] [--length 512] [--sizes 2,3,4]

The text is tqdm's sources (unseen by the built-in model), prefilled in windows of --length tokens; the routers'
choices are read from each MoE layer's router as the prefill runs.
"""
import argparse
import inspect

import torch
import tqdm.std
import tqdm.utils

from dsinfer import LLM, SamplingParams


def record_choices(model) -> list[list[torch.Tensor]]:
    """Per MoE layer, the expert ids its router chose ([tokens, top_k] per call), appended as the model runs."""
    moes = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    chosen = [[] for _ in moes]
    for moe, calls in zip(moes, chosen):
        moe.gate.register_forward_hook(lambda _m, _i, out, calls=calls: calls.append(out[1].detach().clone()))
    return chosen


def distinct(calls: list[torch.Tensor], n: int, size: int) -> torch.Tensor:
    """The number of distinct experts in each window of `size` consecutive rows of each call's ids [tokens, top_k]
    (windows stay within a call: a call is one stretch of text)."""
    windows = torch.cat([ids.unfold(0, size, 1).flatten(1) for ids in calls if len(ids) >= size])
    return torch.zeros(len(windows), n, dtype=torch.bool).scatter_(1, windows, True).sum(1).float()


def uniform(n: int, k: int, size: int) -> float:
    """Expected distinct experts of `size` tokens whose routers each pick k of n uniformly."""
    return n * (1 - (1 - k / n) ** size)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--sizes", default="2,3,4")
    args = ap.parse_args()
    llm = LLM(args.model, enable_prefix_caching=False)
    chosen = record_choices(llm.model)
    ids = llm.tokenizer.encode(inspect.getsource(tqdm.std) + inspect.getsource(tqdm.utils))
    step = (len(ids) - args.length) // args.windows
    for i in range(args.windows):
        llm.generate({"prompt_token_ids": ids[i * step:i * step + args.length]}, SamplingParams(max_tokens=1),
                     use_tqdm=False)
    torch.manual_seed(0)
    n, k = llm.model.config.n_routed_experts, llm.model.config.num_experts_per_tok
    print(f"{len(chosen)} MoE layers, top-{k} of {n} routed experts, {args.windows} windows of {args.length} tokens")
    print("| tokens | consecutive | random pairs of the same text | uniform routers |")
    print("|---:|---:|---:|---:|")
    for size in map(int, args.sizes.split(",")):
        mine = torch.cat([distinct(layer, n, size) for layer in chosen]).mean()
        mixed = torch.cat([distinct([c[torch.randperm(len(c))] for c in layer], n, size) for layer in chosen]).mean()
        print(f"| {size} | {mine:.2f} | {mixed:.2f} | {uniform(n, k, size):.2f} |")


if __name__ == "__main__":
    main()
