"""Wrapper of the prefill MLP kernel (moe_prefill_avx2.c): a MoE layer's routed experts, or a dense SwiGLU MLP,
for many tokens in one call. Built into the same library as the other kernels (see __init__.py)."""
import torch

from dsinfer.kernels.lib import library, ptr
from dsinfer.kernels.matmul import MAX_M

_ERRORS = {1: "expert id out of range", 2: "out of memory for the kernel's scratch", 3: "bad sizes"}


def moe_prefill_usable(x: torch.Tensor, gate_up) -> bool:
    """Whether `moe_prefill` takes these: fp32 [T > MAX_M, D] tokens (fewer go to the decode kernels) and
    contiguous fp32 [E, 2I, D] (unquantized) weights on CPU, library built."""
    return (isinstance(gate_up, torch.Tensor) and x.is_cpu
            and gate_up.is_cpu and x.dim() == 2 and x.shape[0] > MAX_M and x.dtype == torch.float32
            and gate_up.dim() == 3 and gate_up.dtype == torch.float32 and gate_up.is_contiguous()
            and library() is not None)


def moe_prefill(x: torch.Tensor, ids: torch.Tensor | None, weights: torch.Tensor | None, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """x fp32 [T, D], ids int64 [T, K] each token's experts, weights fp32 [T, K] their weights (both None: a dense
    MLP, every token through expert 0 with weight 1), gate_up [E, 2I, D] and down [E, D, I] fp32 ->
    sum_j weights[t, j] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), fp32 [T, D]."""
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_cpu or x.shape[0] < 1:
        raise ValueError(f"x must be fp32 [T >= 1, D] on CPU, not {x.dtype} {tuple(x.shape)} on {x.device}")
    t, d = x.shape
    for name, w in (("gate_up", gate_up), ("down", down)):
        if not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or not w.is_cpu or w.dim() != 3:
            raise ValueError(f"{name} must be a plain fp32 [E, ., .] tensor on CPU")
    if gate_up.shape[1] % 2 or gate_up.shape[1] < 2 or gate_up.shape[2] != d:
        raise ValueError(f"gate_up must be [E, 2I, D = {d}], not {tuple(gate_up.shape)}")
    e, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if tuple(down.shape) != (e, d, inter):
        raise ValueError(f"down must be [E, D, I] = {(e, d, inter)}, not {tuple(down.shape)}")
    k = 0
    if ids is not None:
        if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != t or ids.shape[1] < 1 or not ids.is_cpu:
            raise ValueError(f"ids must be int64 [T = {t}, K >= 1] on CPU, not {ids.dtype} {tuple(ids.shape)}")
        k = ids.shape[1]
        if weights is None or weights.dtype != torch.float32 or tuple(weights.shape) != (t, k):
            raise ValueError(f"weights must be fp32 [{t}, {k}]")
        ids, weights = ids.contiguous(), weights.contiguous()
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    out = torch.empty(t, d, dtype=torch.float32)
    code = library().moe_prefill_f32(x.data_ptr(), ptr(ids), ptr(weights), gate_up.data_ptr(), down.data_ptr(),
                                     out.data_ptr(), t, k, e, d, inter, torch.get_num_threads())
    if code:
        raise ValueError(f"moe_prefill failed: {_ERRORS.get(code, f'error {code}')}")
    return out


def silu_mul_usable(x: torch.Tensor) -> bool:
    """Whether `silu_mul` takes x: bf16 [T, 2I] on CPU, library built."""
    return x.is_cpu and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[1] % 2 == 0 and library() is not None


def silu_mul(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 x [T, 2I] (gate | up), scale fp32 [T] or None -> silu(gate) * up * scale [T, I] bf16, computed in fp32
    and rounded once (torch's bf16 silu_and_mul, the reference, rounds after each op)."""
    if not silu_mul_usable(x):
        raise ValueError(f"silu_mul needs bf16 [T, 2I] on CPU, not {x.dtype} {tuple(x.shape)} on {x.device}")
    t, inter = x.shape[0], x.shape[1] // 2
    if scale is not None and (scale.dtype != torch.float32 or scale.numel() != t):
        raise ValueError(f"scale must be fp32 with {t} values, not {scale.dtype} {tuple(scale.shape)}")
    x = x.contiguous()
    scale = None if scale is None else scale.contiguous()
    out = torch.empty(t, inter, dtype=torch.bfloat16)
    library().silu_mul_bf16(x.data_ptr(), ptr(scale), out.data_ptr(), t, inter, torch.get_num_threads())
    return out


def rms_norm_bf16_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `rms_norm_bf16` takes these: bf16 x [rows, n] with contiguous columns, bf16 weight [n], on CPU."""
    return (x.is_cpu and x.dtype == torch.bfloat16 == w.dtype and x.dim() == 2 and x.stride(1) == 1
            and w.dim() == 1 and x.shape[1] == w.shape[0] and library() is not None)


def rms_norm_bf16(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of bf16 x [rows, n] as transformers computes it in 16 bits (normalised in fp32, rounded to bf16,
    times the bf16 weight), in one pass: bf16 [rows, n]."""
    if not rms_norm_bf16_usable(x, w):
        raise ValueError(f"rms_norm_bf16 needs bf16 x [rows, n] with contiguous columns and a bf16 weight [n] on "
                         f"CPU, not x {x.dtype} {tuple(x.shape)} and weight {w.dtype} {tuple(w.shape)}")
    w, out = w.contiguous(), torch.empty(x.shape, dtype=torch.bfloat16)
    library().rms_norm_bf16(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], x.stride(0), eps,
                            torch.get_num_threads())
    return out
