"""Wrapper of grouped_mm_amx.c: a prefill's routed-expert products on AMX-BF16 tiles, reading each expert's
weight as stored (torch._grouped_mm's oneDNN path repacks it on every call). Same contract as
torch._grouped_mm(x, w.transpose(1, 2), offs=offs), which is the reference the tests compare it with."""
from functools import cache

import torch

from dsinfer.kernels.lib import cpu_flags, library

_ERRORS = {2: "out of memory for the kernel's scratch", 3: "bad sizes or offsets"}


@cache
def amx_ready() -> bool:
    """Whether this CPU has AMX-BF16 tiles and the OS lets this process use them (asked once)."""
    return {"amx_tile", "amx_bf16"} <= cpu_flags() and library() is not None and library().amx_init() == 0


def amx_grouped_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """bf16 x [T, K] and contiguous bf16 w [E, N, K] on CPU with K a multiple of 32."""
    return (x.is_cpu and w.is_cpu and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.dim() == 2
            and w.dim() == 3 and w.is_contiguous() and x.shape[1] == w.shape[2] and w.shape[2] % 32 == 0)


def amx_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y [T, N] bf16: y[t] = w[e] @ x[t] for t in [offs[e - 1], offs[e]) (x sorted by expert, offs the int32
    running ends, as torch._grouped_mm takes them)."""
    if not amx_grouped_usable(x, w):
        raise ValueError(f"amx_grouped_mm needs bf16 x [T, K] and contiguous bf16 w [E, N, K] with K % 32 == 0, "
                         f"not {x.dtype} {tuple(x.shape)} and {w.dtype} {tuple(w.shape)}")
    if not amx_ready():
        raise RuntimeError("amx_grouped_mm: this CPU or OS offers no AMX-BF16 tiles")
    if offs.dtype != torch.int32 or tuple(offs.shape) != (w.shape[0],):
        raise ValueError(f"offs must be int32 [{w.shape[0]}], not {offs.dtype} {tuple(offs.shape)}")
    x, offs = x.contiguous(), offs.contiguous()
    y = torch.empty(x.shape[0], w.shape[1], dtype=torch.bfloat16)
    code = library().grouped_mm_amx_bf16(x.data_ptr(), offs.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0],
                                         w.shape[0], w.shape[1], w.shape[2], torch.get_num_threads())
    if code:
        raise ValueError(f"amx_grouped_mm failed: {_ERRORS.get(code, f'error {code}')}")
    return y
