"""Wrappers of the kernels for the pieces of a decode step's layer: absorbed MLA attention (mla_decode_avx2.c),
a decode batch's experts (moe_decode_avx2.c), the MoE router (router_avx2.c), and fused RMSNorm and MLA rope +
cache write (fused_avx2.c). Built into the same library as the matmul kernels (see __init__.py)."""
import torch

from dsinfer.kernels.lib import library
from dsinfer.kernels.matmul import MAX_M


_MLA_ERRORS = {1: "bad arguments (lens must be in 1..Lmax, seq in 0..B-1)", 2: "a row index is outside the cache",
               3: "out of memory for the kernel's scratch"}


FP8_GROUP = 128  # latent values per scale in an fp8 cache row (dsinfer/layers/kv_format.py)


def fp8_row_bytes(r: int, dr: int) -> int:
    """An fp8 cache row: r e4m3 latent values, an fp32 scale per FP8_GROUP of them, dr bf16 rope values."""
    return r + 4 * -(-r // FP8_GROUP) + 2 * dr


def mla_usable(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether `mla_decode` takes these: fp32 [T, H, D] queries and a contiguous fp32 / bf16 [N, D] or fp8 (uint8
    rows) cache on CPU."""
    return (q.device.type == "cpu" and cache.device.type == "cpu" and q.dim() == 3
            and q.dtype == torch.float32 and cache.dim() == 2
            and cache.dtype in (torch.float32, torch.bfloat16, torch.uint8)
            and cache.is_contiguous() and library() is not None)


def _int64(x: torch.Tensor, dims: int, what: str):
    if x.dtype != torch.int64 or x.dim() != dims or x.device.type != "cpu":
        raise ValueError(f"{what}, not {x.dtype} {tuple(x.shape)} on {x.device}")


def mla_decode(q: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, seq: torch.Tensor, lens: torch.Tensor,
               scale: float, r: int) -> torch.Tensor:
    """Absorbed MLA decode attention (see mla_decode_avx2.c): q fp32 [T, H, D], cache fp32 / bf16 [N, D] (D = r +
    rope dims) or fp8 uint8 [N, fp8_row_bytes(r, D - r)], rows int64 [B, Lmax] cache rows of each sequence's
    positions, seq int64 [T] each token's sequence, lens int64 [T] how many leading positions it sees ->
    softmax(scale * q . ctx) @ ctx[:, :r], fp32 [T, H, r]."""
    if q.dtype != torch.float32 or q.dim() != 3 or q.device.type != "cpu" or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"q must be fp32 [T, H, D] on CPU, not {q.dtype} {tuple(q.shape)} on {q.device}")
    t, h, d = q.shape
    if not 1 <= r <= d:
        raise ValueError(f"r must be in 1..{d}, not {r}")
    width = fp8_row_bytes(r, d - r) if cache.dtype == torch.uint8 else d
    if cache.dtype not in (torch.float32, torch.bfloat16, torch.uint8) or cache.dim() != 2 \
            or cache.shape[1] != width or cache.device.type != "cpu":
        raise ValueError(f"cache must be fp32 or bf16 [N, {d}] or fp8 uint8 [N, {fp8_row_bytes(r, d - r)}] on CPU, "
                         f"not {cache.dtype} {tuple(cache.shape)}")
    _int64(rows, 2, "rows must be int64 [B, Lmax] on CPU")
    _int64(seq, 1, f"seq must be int64 [{t}] on CPU")
    _int64(lens, 1, f"lens must be int64 [{t}] on CPU")
    b, lmax = rows.shape
    if seq.shape[0] != t or lens.shape[0] != t or lmax < 1:
        raise ValueError(f"seq and lens must have T = {t} entries and rows at least one column: seq "
                         f"{tuple(seq.shape)}, lens {tuple(lens.shape)}, rows {tuple(rows.shape)}")
    q, cache, rows, seq, lens = (x.contiguous() for x in (q, cache, rows, seq, lens))
    out = torch.empty(t, h, r, dtype=torch.float32)
    fn = {torch.float32: library().mla_decode_f32, torch.bfloat16: library().mla_decode_bf16,
          torch.uint8: library().mla_decode_fp8}[cache.dtype]
    code = fn(q.data_ptr(), cache.data_ptr(), rows.data_ptr(), seq.data_ptr(), lens.data_ptr(), out.data_ptr(),
              t, h, r, d - r, lmax, b, cache.shape[0], float(scale), torch.get_num_threads())
    if code:  # the kernel checks seq, lens and every row index it would read before reading any
        raise ValueError(f"mla_decode failed: {_MLA_ERRORS.get(code, f'error {code}')} (B = {b}, Lmax = {lmax})")
    return out


def _heads_stride(x: torch.Tensor) -> int | None:
    """The step between consecutive (token, head) vectors of x [T, H, n], if one step walks them all."""
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) != x.shape[1] * x.stride(1)):
        return None
    return x.stride(1)


def absorb_usable(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b: torch.Tensor) -> bool:
    """Whether mla_absorb / mla_expand take these: fp32 on CPU, kv_b contiguous, q parts one step per head."""
    return (isinstance(kv_b, torch.Tensor) and kv_b.is_contiguous()
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (q_nope, q_pe, kv_b))
            and _heads_stride(q_nope) is not None and _heads_stride(q_pe) is not None and library() is not None)


def mla_absorb(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b: torch.Tensor, r: int, dv: int) -> torch.Tensor:
    """(W_uk[h]^T q_nope, q_pe) per token and head: q_nope [T, H, dn], q_pe [T, H, dr], kv_b [H (dn + dv), r]
    -> [T, H, r + dr]. Each (token, head) is computed on its own, the same bits in any batch."""
    t, h, dn = q_nope.shape
    dr = q_pe.shape[2]
    if q_pe.shape[:2] != (t, h) or kv_b.shape != (h * (dn + dv), r):
        raise ValueError(f"mla_absorb: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)} and kv_b "
                         f"{tuple(kv_b.shape)} do not fit (r = {r}, dv = {dv})")
    qc = torch.empty(t, h, r + dr, dtype=torch.float32)
    library().mla_absorb_f32(q_nope.data_ptr(), _heads_stride(q_nope), q_pe.data_ptr(), _heads_stride(q_pe),
                             kv_b.data_ptr(), qc.data_ptr(), t, h, dn, dr, dv, r, torch.get_num_threads())
    return qc


def mla_expand(o_lat: torch.Tensor, kv_b: torch.Tensor, dn: int, dv: int) -> torch.Tensor:
    """W_uv[h] o_lat per token and head: o_lat [T, H, r] fp32 contiguous, kv_b [H (dn + dv), r] -> [T, H, dv]."""
    t, h, r = o_lat.shape
    if kv_b.shape != (h * (dn + dv), r) or not o_lat.is_contiguous():
        raise ValueError(f"mla_expand: o_lat {tuple(o_lat.shape)} and kv_b {tuple(kv_b.shape)} do not fit")
    out = torch.empty(t, h, dv, dtype=torch.float32)
    library().mla_expand_f32(o_lat.data_ptr(), kv_b.data_ptr(), out.data_ptr(), t, h, dn, dv, r,
                             torch.get_num_threads())
    return out


_MOE_ERRORS = {1: "expert id out of range",
               2: "out of memory for the kernel's scratch", 3: "bad sizes"}


def moe_usable(x: torch.Tensor, gate_up) -> bool:
    """Whether `moe_decode` takes these: fp32 [T <= MAX_M, D] tokens and contiguous fp32 / bf16 [E, 2I, D]
    (unquantized) expert weights on CPU, library built."""
    return (isinstance(gate_up, torch.Tensor) and x.is_cpu and gate_up.is_cpu
            and x.dim() == 2 and 0 < x.shape[0] <= MAX_M
            and x.dtype == torch.float32 and gate_up.dim() == 3 and gate_up.dtype in (torch.float32, torch.bfloat16)
            and gate_up.is_contiguous() and library() is not None)


def moe_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """Routed experts for a few tokens in one call (see moe_decode_avx2.c): x fp32 [T <= MAX_M, D], ids int64
    [T, K] each token's experts, weights [T, K] their weights, gate_up [E, 2I, D] and down [E, D, I] both fp32
    or both bf16 -> sum_j weights[t, j] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), fp32 [T, D]."""
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_cpu or not 0 < x.shape[0] <= MAX_M:
        raise ValueError(f"x must be fp32 [T <= {MAX_M}, D] on CPU, not {x.dtype} {tuple(x.shape)} on {x.device}")
    t, d = x.shape
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise ValueError("gate_up and down must be plain (unquantized) tensors")
    if gate_up.dtype not in (torch.float32, torch.bfloat16) or down.dtype != gate_up.dtype \
            or not gate_up.is_cpu or not down.is_cpu:
        raise ValueError(f"gate_up and down must be both fp32 or both bf16 on CPU, not {gate_up.dtype} on "
                         f"{gate_up.device} and {down.dtype} on {down.device}")
    if gate_up.dim() != 3 or gate_up.shape[1] % 2 or gate_up.shape[1] < 2 or gate_up.shape[2] != d:
        raise ValueError(f"gate_up must be [E, 2I, D = {d}], not {tuple(gate_up.shape)}")
    e, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if tuple(down.shape) != (e, d, inter):
        raise ValueError(f"down must be [E, D, I] = {(e, d, inter)}, not {tuple(down.shape)}")
    _int64(ids, 2, f"ids must be int64 [{t}, K] on CPU")
    k = ids.shape[1]
    if ids.shape[0] != t or k < 1:
        raise ValueError(f"ids must be [T = {t}, K >= 1], not {tuple(ids.shape)}")
    if weights.dtype != torch.float32 or tuple(weights.shape) != (t, k) or not weights.is_cpu:
        raise ValueError(f"weights must be fp32 [{t}, {k}] on CPU, not {weights.dtype} {tuple(weights.shape)} "
                         f"on {weights.device}")
    x, ids, weights, gate_up, down = (v.contiguous() for v in (x, ids, weights, gate_up, down))
    out = torch.empty(t, d, dtype=torch.float32)
    fn = library().moe_decode_f32 if gate_up.dtype == torch.float32 else library().moe_decode_bf16
    code = fn(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), gate_up.data_ptr(), down.data_ptr(), out.data_ptr(),
              t, k, e, d, inter, torch.get_num_threads(), MAX_M)
    if code:
        raise ValueError(f"moe_decode failed: {_MOE_ERRORS.get(code, f'error {code}')}")
    return out


_ONE_EXPERT = torch.zeros(MAX_M, 1, dtype=torch.long), torch.ones(MAX_M, 1, dtype=torch.float32)


def mlp_decode(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU MLP for a few tokens: x fp32 [T <= MAX_M, D], gate_up [2I, D], down [D, I] -> fp32 [T, D];
    the experts kernel with one expert that every token takes with weight 1."""
    ids, weights = _ONE_EXPERT
    t = x.shape[0]
    return moe_decode(x, ids[:t], weights[:t], gate_up[None], down[None])


def fused_usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused elementwise kernels (fused_avx2.c) take these: fp32 on CPU, library built."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and library() is not None)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of fp32 x [rows, n] (rows may be strided, columns contiguous) with fp32 weight w [n] -> [rows, n]."""
    n = w.shape[0]
    if x.dim() != 2 or x.shape[1] != n or x.stride(1) != 1 or not w.is_contiguous():
        raise ValueError(f"rms_norm takes x [rows, {n}] with contiguous columns and a contiguous weight, not x "
                         f"{tuple(x.shape)} strides {x.stride()}")
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    library().rms_norm_f32(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], n, x.stride(0), eps)
    return out


def mla_rope_cache(q: torch.Tensor, kv: torch.Tensor, w: torch.Tensor, eps: float, cis: torch.Tensor,
                   cache: torch.Tensor, slots: torch.Tensor, dn: int):
    """MLA between projections and attention (fused_avx2.c): turns the rope part of q [T, H, dn + dr] in place,
    and writes each token's cache row (RMSNorm(latent) * w, turned roped key) from kv [T, r + dr] at slots [T];
    cis [T, dr/2] complex gives the turns. All fp32, contiguous."""
    t, h, dq = q.shape
    dr, n = dq - dn, cache.shape[0]
    r = kv.shape[1] - dr
    fine = (q.is_contiguous() and kv.is_contiguous() and cache.is_contiguous() and w.is_contiguous()
            and kv.shape[0] == t == slots.shape[0] and cis.shape == (t, dr // 2) and cis.dtype == torch.complex64
            and cis.is_contiguous()
            and cache.shape[1] == r + dr and w.shape == (r,) and slots.dtype == torch.int64 and dr % 2 == 0)
    if not fine:
        raise ValueError(f"mla_rope_cache: q {tuple(q.shape)}, kv {tuple(kv.shape)}, norm weight {tuple(w.shape)}, "
                         f"cis {cis.dtype} {tuple(cis.shape)}, cache {tuple(cache.shape)}, slots {slots.dtype} "
                         f"{tuple(slots.shape)} do not fit together (contiguous fp32, dn = {dn})")
    cs = torch.view_as_real(cis)
    if library().mla_rope_cache_f32(q.data_ptr(), kv.data_ptr(), w.data_ptr(), eps, cs.data_ptr(), cache.data_ptr(),
                                    slots.contiguous().data_ptr(), t, h, dn, dr, r, n):
        raise ValueError(f"mla_rope_cache: a slot is outside the cache's {n} rows")


ROUTE_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}  # the codes router_avx2.c knows
_ROUTE_SCORING = {"softmax": 0, "sigmoid": 1}
_ROUTE_ERRORS = {1: "bad arguments (sizes, top_k, or groups that do not fit)", 2: "out of memory"}


def route_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `route` takes these: fp32 contiguous [T <= MAX_M, D] tokens and a contiguous fp32 / bf16 [E, D]
    router weight on CPU, library built."""
    return (x.is_cpu and weight.is_cpu and x.dtype == torch.float32 and x.dim() == 2
            and 0 < x.shape[0] <= MAX_M and x.is_contiguous() and weight.dim() == 2
            and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous() and library() is not None)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: torch.Tensor | None, top_k: int,
          n_group: int, topk_group: int, method: str, scoring: str, norm_topk_prob: bool,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepSeekMoE router in one call (router_avx2.c; the same as dsinfer.layers.moe.Router.plain): x fp32
    [T, D], weight fp32 / bf16 [E, D], bias fp32 [E] or None (changes the choice, never the weights), counts int64
    [E] or None (each chosen expert's entry += 1) -> (weights fp32 [T, top_k], ids int64 [T, top_k]), ids by
    descending biased score."""
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_cpu or x.shape[0] < 1:
        raise ValueError(f"x must be fp32 [T >= 1, D] on CPU, not {x.dtype} {tuple(x.shape)} on {x.device}")
    t, d = x.shape
    if weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2 or weight.shape[1] != d \
            or not weight.is_cpu:
        raise ValueError(f"weight must be fp32 or bf16 [E, {d}] on CPU, not {weight.dtype} {tuple(weight.shape)}")
    e = weight.shape[0]
    if bias is not None:
        if bias.shape != (e,) or not bias.is_cpu or not bias.is_floating_point():
            raise ValueError(f"bias must be a float [{e}] tensor on CPU, not {bias.dtype} {tuple(bias.shape)}")
        if bias.dtype != torch.float32 or not bias.is_contiguous():
            bias = bias.float().contiguous()
    if counts is not None and (counts.dtype != torch.int64 or counts.shape != (e,) or not counts.is_cpu
                               or not counts.is_contiguous()):
        raise ValueError(f"counts must be contiguous int64 [{e}] on CPU, not {counts.dtype} {tuple(counts.shape)}")
    if method not in ROUTE_METHODS or scoring not in _ROUTE_SCORING or not 0 < top_k <= e:
        raise ValueError(f"unknown topk method {method!r} or scoring {scoring!r}, or top_k {top_k} not in 1..{e}")
    if not x.is_contiguous():
        x = x.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    w = torch.empty(t, top_k, dtype=torch.float32)
    ids = torch.empty(t, top_k, dtype=torch.int64)
    code = library().route_f32(x.data_ptr(), weight.data_ptr(), weight.dtype == torch.bfloat16,
                               None if bias is None else bias.data_ptr(), w.data_ptr(), ids.data_ptr(),
                               None if counts is None else counts.data_ptr(), t, d, e, top_k, n_group, topk_group,
                               ROUTE_METHODS[method], _ROUTE_SCORING[scoring], bool(norm_topk_prob), scale)
    if code:
        raise ValueError(f"route failed: {_ROUTE_ERRORS.get(code, f'error {code}')} (E = {e}, top_k = {top_k}, "
                         f"n_group = {n_group}, topk_group = {topk_group}, method {method})")
    return w, ids
