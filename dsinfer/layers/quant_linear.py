"""x @ W.T for a quantized W (dsinfer.quant.qtensor.QTensor) without a full-precision copy of W.

Decode-sized fp32 batches on CPU run dsinfer's packed-weight kernel, which reads each packed row once for
every row of x. The kernel also rounds x to int8 (one scale per 32 values) and multiplies in integers, as
llama.cpp does: 1.6x faster than unpacking int4 nibbles to fp32 (switch: KernelConfig.int8_activations, or
DSINFER_INT8_ACTIVATIONS=0, for the exact dequantize-then-matmul). Larger batches (prefill) dequantize a tile of
rows at a time and hand it to torch's matmul, so only one tile is ever in full precision. On CPUs that multiply
bf16 natively (AMX, AVX512-BF16) the tiles are bf16 and so is the matmul, x rounded to bf16 once per call:
3-7x fp32's rate there (switch: KernelConfig.bf16_prefill_tiles, or DSINFER_BF16_PREFILL_TILES=0). The plain
path (kernels off, other devices) tiles the same way with torch's own ops, and is what the tests compare the
kernels against."""
import functools

import torch
import torch.nn.functional as F

from dsinfer import kernels
from dsinfer.quant.qtensor import QTensor

TILE_VALUES = 1 << 20  # weights per dequantized tile on CPU (4 MiB in fp32: stays in cache)
BF16_TILE_VALUES = 1 << 21  # ... for bf16 tiles (4 MiB too: oneDNN's bf16 matmul gains from the longer tiles)
ROW_BUCKET = 16  # bf16 tiles multiply x padded to a multiple of this many rows (see padded_rows)
GPU_TILE_VALUES = 1 << 24  # on other devices larger tiles keep kernel launches few (64 MiB in fp32)


def qlinear(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None, use_kernels: bool = False,
            int8: int = 0, bf16_tiles: bool = False, small: bool = False) -> torch.Tensor:
    """use_kernels / int8 / bf16_tiles / small: the model's KernelConfig.cpu_kernels, int8_kernel (0 off, 1 AVX2,
    2 AVX-VNNI), bf16_prefill_tiles and small_gemm. small: fp32 batches of up to SMALL_MAX_M rows (a decode step
    of more than MAX_M rows, a speculative verify step's logits, a prefill's per-expert products) run the decode
    kernel MAX_M rows at a time, each pass reading w once, instead of expanding all of w in tiles (which for a
    [102400, 2048] int8 head and 16 rows took 208 ms against 69)."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    if use_kernels and kernels.q_usable(x):
        y = decode_rows(x, w, int8)
    elif bf16_tiles and bf16_tiles_fit(x, w):
        y = tiled(padded_rows(x), w, use_kernels, torch.bfloat16)[:x.shape[0]]
    elif small and use_kernels and kernels.q_usable(x, kernels.SMALL_MAX_M):
        y = kernels.in_row_chunks(functools.partial(decode_rows, w=w, int8=int8), x)
    else:
        y = tiled(kernels.round_to_int8(x) if int8 and use_kernels and int8_activations_fit(x, w) else x, w,
                  use_kernels)
    return y if bias is None else y + bias


def decode_rows(x: torch.Tensor, w: QTensor, int8: int) -> torch.Tensor:
    """The decode kernel on at most MAX_M fp32 rows, with int8 activations where `int8` and the layout allow."""
    int8_x = int8 if int8 and int8_activations_fit(x, w) else 0
    return kernels.qgemv(x, w.q, w.scales, w.mins, w.bits, w.group_size, int8_activations=int8_x)


def bf16_tiles_fit(x: torch.Tensor, w: QTensor) -> bool:
    """Whether tiles of w may be dequantized to bf16 for x: fp32 or bf16 x on CPU, where the kernels expand the
    tiles. fp32 x is rounded to bf16 once, not to int8 (see docs/architecture.md): the bf16 rounding of x and of
    the weights already parts prefill's numbers from decode's, and int8 on top would only add error."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2
            and kernels.dequant_usable(w.q))


def padded_rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] with zero rows added up to a multiple of ROW_BUCKET. oneDNN keeps a primitive of 0.6-1 MiB for
    each (M, N, K) it multiplies in bf16 (up to 1024 of them), and a prefill's experts see every M from 9 up:
    without this a long-running server would hold ~1 GiB of them. The padding costs little: AMX tiles have 16
    rows anyway."""
    pad = padded(x.shape[0]) - x.shape[0]
    return x if not pad else torch.cat([x, x.new_zeros(pad, x.shape[1])])


def padded(m: int) -> int:
    return m + -m % ROW_BUCKET


def stack_fits_bf16(w, x: torch.Tensor) -> bool:
    """Whether a stack of quantized expert matrices can run Experts.dequantized for x: a prefill-sized batch
    that bf16 tiles take, and no column permutation (each expert's would reorder x differently)."""
    return isinstance(w, QTensor) and w.perm is None and x.shape[0] > kernels.MAX_M and bf16_tiles_fit(x, w)


def dequantize_into(w: QTensor, out: torch.Tensor) -> torch.Tensor:
    """The whole of w [N, K] expanded by the kernel into out, a contiguous bf16 [N, K] buffer."""
    return kernels.dequant(w.q, w.scales, w.mins, w.bits, w.group_size, w.k, out=out, dtype=torch.bfloat16)


def int8_activations_fit(x: torch.Tensor, w: QTensor) -> bool:
    """Whether this matmul can multiply int8-rounded activations: fp32 x on CPU and a layout that allows it.
    Prefill tiles then round x the same way, so that a sequence gets the same numbers whether its rows ran in
    a decode batch or in a prefill."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and kernels.dequant_usable(w.q)
            and kernels.int8_activations_fit(w.bits, w.k, w.group_size))


def tiled(x: torch.Tensor, w: QTensor, use_kernels: bool = False, tile_dtype: torch.dtype | None = None
          ) -> torch.Tensor:
    """x @ w.T a tile of dequantized rows at a time, in tile_dtype (default: x's); the result has x's dtype."""
    n, k = w.shape
    dtype = x.dtype if tile_dtype is None else tile_dtype
    store = dtype if dtype in kernels.DEQUANT_DTYPES else torch.float32  # what the kernel writes
    values = GPU_TILE_VALUES if x.device.type != "cpu" else TILE_VALUES if tile_dtype is None else BF16_TILE_VALUES
    rows = max(16, values // k)
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    xt = x.to(dtype)  # once per call, not per tile
    fast, buf = use_kernels and kernels.dequant_usable(w.q), None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if fast:  # one tile buffer for the whole matrix (the last, shorter tile gets its own)
            reuse = buf if buf is not None and buf.shape[0] == r1 - r0 else None
            tile = buf = kernels.dequant(w.q, w.scales, w.mins, w.bits, w.group_size, k, r0, r1, out=reuse,
                                         dtype=store)
        else:
            tile = w[r0:r1].dequantize()
        y[..., r0:r1] = F.linear(xt, tile.to(dtype))
    return y
