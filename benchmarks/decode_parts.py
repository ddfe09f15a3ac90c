"""Where a fused decode step's time goes, per part, for 1, 2, 3 ... tokens of one stream: each layer's
attention half (and within it the MLA attention kernel over the cache), its dense MLP or router + routed
experts and shared experts, and the LM head, each timed through the same C calls the fused decoder makes, with
the bytes of weights it reads and the rate that gives (GB/s). A part whose time grows faster than its bytes from
1 to 2 tokens is not reading its weights once for all tokens.

Cold (default): each part alone, the best of --repeats calls each after --flush-mb MB of other reads. --warm:
the parts called in a step's order, --repeats steps, each part's median: what they cost inside whole steps,
whose weights partly stay in a large L3 from one step to the next.

    python benchmarks/decode_parts.py MODEL [--dtype bfloat16] [--threads 2] [--tokens 1,2,3] [--warm]
"""
import argparse
from statistics import median
from time import perf_counter

import torch

from dsinfer import LLM, kernels
from dsinfer.kernels.decode_layer import run_attention, run_ffn
from dsinfer.models.fused_decode import decode_step


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def attention_bytes(attn) -> int:
    names = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    return nbytes(*(getattr(attn, n).weight for n in names if hasattr(attn, n)))


def parts_of(mlp_layer_c):
    """(routed-only, shared-only) copies of a MoE layer's struct."""
    routed = type(mlp_layer_c).from_buffer_copy(mlp_layer_c)
    routed.sh_gate_up = type(routed.sh_gate_up)()
    shared = type(mlp_layer_c).from_buffer_copy(mlp_layer_c)
    shared.experts, shared.gate_up, shared.down, shared.inter = 0, mlp_layer_c.sh_gate_up, mlp_layer_c.sh_down, \
        mlp_layer_c.sh_inter
    shared.sh_gate_up, shared.first_expert, shared.local_experts = type(shared.sh_gate_up)(), 0, 0
    return routed, shared


def cold_timer(repeats: int, flush_mb: int):
    """Times parts [(name, C call returning 0 on success, bytes)]: each the best of `repeats` single calls, each
    after flush_mb MB of other data were read (the parts are small enough to stay in a large L3 between calls,
    which a real step's parts do not)."""
    flush = torch.ones(flush_mb << 18, dtype=torch.float32)

    def time(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            flush.sum()
            start = perf_counter()
            code = fn()
            best = min(best, perf_counter() - start)
            if code:
                raise RuntimeError(f"C call failed with {code}")
        return best
    return lambda parts: [(name, time(fn), b) for name, fn, b in parts]


def warm_timer(repeats: int):
    """Times parts by calling them in order `repeats` times (after one warm-up round): each part's median."""
    def time(parts):
        seconds = [[] for _ in parts]
        for rep in range(repeats + 1):
            for i, (_, fn, _) in enumerate(parts):
                start = perf_counter()
                code = fn()
                if rep:
                    seconds[i].append(perf_counter() - start)
                if code:
                    raise RuntimeError(f"C call failed with {code}")
        return [(name, median(s), b) for (name, _, b), s in zip(parts, seconds)]
    return time


def mla_part(layer, cache, meta, positions, t: int):
    """The MLA attention kernel alone over the step's cache rows (random queries)."""
    attn = layer.self_attn
    q, lens = torch.randn(t, attn.h, attn.r + attn.dr), positions + 1
    return lambda: kernels.mla_decode(q, cache, meta.gather_index, meta.token_seq, lens, attn.scale, attn.r) is None


def measure(llm, t: int, time, moe_layers: int) -> list[tuple[str, float, int]]:
    """(part, seconds, bytes read) for a step of t tokens of one stream at context 128."""
    runner, model, fused = llm.engine.runner, llm.model, llm.engine.runner.fused
    bs, d, threads = llm.engine.cache.block_size, model.config.hidden_size, torch.get_num_threads()
    per = -(-(128 + t) // bs)
    ids, positions, meta = runner.inputs([(list(range(3, 3 + t)), 128, list(range(per)))], 0)
    step, _kept = decode_step(model.model.rotary, positions, meta, fused.caches[0], t)
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t)).contiguous()
    out = torch.empty_like(x)
    lib, parts = fused.lib, []
    for i, (layer, lc, cache) in enumerate(zip(model.model.layers, fused.layers, fused.caches)):
        if lc.experts and moe_layers == 0:
            continue
        moe_layers -= bool(lc.experts)
        mlp = layer.mlp
        parts.append((f"layer {i} attention", lambda lc=lc, cache=cache: run_attention(
            lib, lc, step, x.data_ptr(), cache.data_ptr(), out.data_ptr(), threads), attention_bytes(layer.self_attn)))
        parts.append((f"layer {i} (MLA attention kernel)", mla_part(layer, cache, meta, positions, t), 0))
        if not lc.experts:
            parts.append((f"layer {i} dense MLP", lambda lc=lc: run_ffn(lib, lc, step, x.data_ptr(), out.data_ptr(),
                                                                         threads),
                          nbytes(mlp.gate_up_proj, mlp.down_proj)))
            continue
        routed, shared = parts_of(lc)
        before = mlp.expert_counts.clone()
        run_ffn(lib, routed, step, x.data_ptr(), out.data_ptr(), threads)
        used = int(((mlp.expert_counts - before) > 0).sum())
        per_expert = nbytes(mlp.experts.gate_up_proj, mlp.experts.down_proj) // mlp.experts.n
        parts.append((f"layer {i} router + routed experts", lambda r=routed: run_ffn(
            lib, r, step, x.data_ptr(), out.data_ptr(), threads), used * per_expert + nbytes(mlp.gate.weight)))
        sh = mlp.shared_experts
        parts.append((f"layer {i} shared experts", lambda s=shared: run_ffn(lib, s, step, x.data_ptr(),
                                                                             out.data_ptr(), threads),
                      nbytes(sh.gate_up_proj, sh.down_proj)))
    head = model.lm_head.weight
    h = x.to(llm.dtype)
    parts.append(("LM head", lambda: model.compute_logits(h) is None, nbytes(head)))
    return time(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=20, help="calls per part (the best is kept)")
    ap.add_argument("--flush-mb", type=int, default=1024, help="data touched between calls to empty the caches")
    ap.add_argument("--layers", type=int, default=1, help="MoE layers to time (the first ones; dense ones always)")
    ap.add_argument("--warm", action="store_true", help="parts in a step's order, no flush (median of repeats)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, max_model_len=1024, max_num_seqs=8, enable_prefix_caching=False, dtype=args.dtype)
    tokens = [int(t) for t in args.tokens.split(",")]
    with torch.inference_mode():
        time = warm_timer(args.repeats) if args.warm else cold_timer(args.repeats, args.flush_mb)
        table = {t: measure(llm, t, time, args.layers) for t in tokens}
    print(f"\n{args.dtype}, {args.threads} thread(s), context 128, {'warm' if args.warm else 'cold'}; "
          f"ms (GB/s), and x the 1-token time")
    print("| part | " + " | ".join(f"{t} token(s)" for t in tokens) + " |\n|---|" + "---:|" * len(tokens))
    for j, (name, _, _) in enumerate(table[tokens[0]]):
        base = table[tokens[0]][j][1]
        cells = [f"{s * 1e3:.2f} ({b / s / 1e9:.1f}) x{s / base:.2f}" for _, s, b in (table[t][j] for t in tokens)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    total = {t: sum(s for name, s, _ in table[t] if "kernel)" not in name) for t in tokens}
    print("| sum of parts | " + " | ".join(f"{total[t] * 1e3:.2f} x{total[t] / total[tokens[0]]:.2f}"
                                          for t in tokens) + " |")


if __name__ == "__main__":
    main()
