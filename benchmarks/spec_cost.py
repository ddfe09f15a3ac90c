"""What speculative decoding's steps cost on a model of real shapes, relative to one plain decode step, and the
speed-up those costs give at a given acceptance. For checkpoints without an MTP layer (random-weight benchmark
models accept nothing anyway), the draft layer is one more copy of the model's last decoder layer with random
enorm, hnorm and eh_proj: the same shapes and cost as a real one.

    python benchmarks/spec_cost.py MODEL [--streams 1,8] [--context 128] [--acceptance 0.85,0.9]

Per stream count B (each stream at `context` cached tokens): a plain decode step (B tokens: the model and the
logits of B rows); a verify step of k + 1 tokens per stream (the model over B (k + 1) tokens, and their logits);
a draft step (the MTP layer over one token per stream, and its logits). A step with k drafts costs one verify,
one catch-up (the MTP layer over up to k + 1 tokens per stream; timed as k + 1) and k - 1 draft steps; it emits
1 + a + a^2 + ... + a^k tokens per stream in expectation when each draft is accepted with probability a.
Steps take turns, round after round; "x plain step" is the median over rounds of a step's time over the plain
step's in the same round (ms: the best round). Each verify step also shows the weight bytes it reads (of the
routed experts, those its routers chose, counted): a step bound by memory bandwidth cannot cost less than that
ratio to the plain step.
"""
import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import best_seconds_per_call  # noqa: E402

from dsinfer import LLM  # noqa: E402
from dsinfer.layers import kv_format  # noqa: E402
from dsinfer.models.mtp import FusedDraft, MTPLayer, quantize_draft  # noqa: E402


def draft_layer(llm, quantization: str) -> MTPLayer:
    model = llm.model
    with torch.device(llm.device):
        mtp = MTPLayer(model, "auto", model.kernel_config).to(llm.dtype).eval()
    last = model.model.layers[-1].state_dict()
    mtp.load_state_dict(last, strict=False)  # the decoder layer's weights; enorm, hnorm, eh_proj stay as built
    torch.nn.init.normal_(mtp.eh_proj.weight, std=0.02)
    if quantization == "auto":  # as the engine resolves spec_draft_quantization
        quantization = "int8" if model.kernel_config.fused_decode else "none"
    if quantization != "none":
        quantize_draft(mtp, quantization)
    return mtp


def draft_logits(mtp, fused, cache, ids, hidden, positions, meta, last):
    """The draft step as the engine runs it: the MTP layer's output at each stream's last row and the draft head's
    logits there, in one C call where it applies (spec_draft_one_call), else through the layer."""
    if fused is not None and fused.takes_one_call(len(ids), meta):
        return fused.one_call(ids, hidden, positions, meta, last)[1]
    return mtp.compute_logits(mtp(ids, hidden, positions, meta, cache, fused, last))


def entries(streams: int, tokens: int, context: int, block_size: int):
    """One block table per stream, `context` tokens cached, `tokens` new ones: each stream its own tokens, so that
    streams route to experts as different requests would."""
    per = -(-(context + tokens) // block_size)
    return [(list(range(3 + 101 * i, 3 + 101 * i + tokens)), context, list(range(i * per, (i + 1) * per)))
            for i in range(streams)]


def measure(steps: dict, seconds: float, rounds: int) -> tuple[dict, dict]:
    """Each step's best seconds per call, and the median over rounds of its time over the plain step's in the same
    round: the steps take turns, round after round, so a drift of the machine's speed cancels in the ratios."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(best_seconds_per_call(fn, seconds, 1))
    ratios = {name: statistics.median(a / b for a, b in zip(ts, times["verify 1"])) for name, ts in times.items()}
    return {name: min(ts) for name, ts in times.items()}, ratios


def weight_bytes(model, run) -> int:
    """The bytes of weights a step (run()) reads: all but the embedding table, and of the routed experts only those
    its routers chose (counted by the MoE layers' expert_counts)."""
    moes = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "expert_counts")]
    for moe in moes:
        moe.expert_counts.zero_()
    run()
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    routed = [(moe.experts.gate_up_proj, moe.experts.down_proj) for moe in moes]
    every = size(p for n, p in model.named_parameters() if "embed_tokens" not in n) - size(p for r in routed for p in r)
    used = sum(size(r) * int((moe.expert_counts > 0).sum()) / moe.experts.n for r, moe in zip(routed, moes))
    return every + used


def costs(llm, mtp, streams: int, context: int, ks: list[int]) -> tuple[dict, dict]:
    """The steps to time (name -> function) and the weight bytes each verify step reads (by token count)."""
    runner, model = llm.engine.runner, llm.model
    bs, d = llm.engine.cache.block_size, model.config.hidden_size
    rows = llm.engine.cache.layers[0].shape[0]
    cache = kv_format.allocate(llm.engine.cache.kv_dtype, rows, model.config.kv_lora_rank,
                               model.config.qk_rope_head_dim, llm.device)
    fused = FusedDraft.build(model, mtp, cache, chunk_decodes=True)
    steps, read = {}, {}
    for t in [1] + [k + 1 for k in ks]:
        ids, positions, meta = runner.inputs(entries(streams, t, context, bs), 0)
        hidden = torch.randn(len(ids), d, dtype=llm.dtype)
        verify = functools.partial(lambda *a: model.compute_logits(runner.run_model(*a)), ids, positions, meta)
        read[t] = weight_bytes(model, verify)
        steps[f"verify {t}"] = verify
        last = torch.arange(t - 1, len(ids), t)
        steps[f"mtp {t}"] = functools.partial(draft_logits, mtp, fused, cache, ids, hidden, positions, meta, last)
    return steps, read


def speedup(x: dict[str, float], k: int, a: float) -> float:
    """Tokens per plain step's time, from the steps' costs x in plain steps."""
    return sum(a ** i for i in range(k + 1)) / (x[f"verify {k + 1}"] + x[f"mtp {k + 1}"] + (k - 1) * x["mtp 1"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--ks", default="1,2,3")
    ap.add_argument("--acceptance", default="0.85,0.9")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CPUs with AMX or AVX512-BF16), float32, ...")
    ap.add_argument("--draft-quantization", default="auto",
                    help="the draft's spec_draft_quantization: auto (int8 where the fused kernels draft), int8, int4, "
                         "none")
    ap.add_argument("--seconds", type=float, default=0.5, help="minimum time of each measurement")
    ap.add_argument("--rounds", type=int, default=5, help="rounds in which every step is measured once, in turn")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks, rates = [int(k) for k in args.ks.split(",")], [float(a) for a in args.acceptance.split(",")]
    llm = LLM(args.model, max_model_len=1024, max_num_seqs=8, enable_prefix_caching=False, dtype=args.dtype)
    mtp = draft_layer(llm, args.draft_quantization)
    llm.engine.runner.chunk_decodes = True  # as with speculation: verify steps over 8 tokens in fused chunks
    with torch.inference_mode():
        for b in map(int, args.streams.split(",")):
            steps, read = costs(llm, mtp, b, args.context, ks)
            c, x = measure(steps, args.seconds, args.rounds)
            base = c["verify 1"]
            print(f"\n{b} stream(s), context {args.context}, {args.dtype}, {torch.get_num_threads()} thread(s), "
                  f"draft quantization {args.draft_quantization}: plain decode step {base * 1e3:.1f} ms")
            print("| step | ms | x plain step | weights read, MB (x plain step) |\n|---|---:|---:|---:|")
            for name, s in c.items():
                t = int(name.split()[1])
                bytes_read = f"{read[t] / 1e6:.0f} ({read[t] / read[1]:.3f})" if name.startswith("verify") else "-"
                print(f"| {name} token(s) per stream | {s * 1e3:.1f} | {x[name]:.2f} | {bytes_read} |")
            print(f"\n| k | " + " | ".join(f"speed-up at {a:.0%}" for a in rates) + " |\n|---|"
                  + "---:|" * len(rates))
            for k in ks:
                print(f"| {k} | " + " | ".join(f"{speedup(x, k, a):.2f}" for a in rates) + " |")


if __name__ == "__main__":
    main()
