"""x @ W.T for a quantized W (dsinfer.quant.qtensor.QTensor) without a full-precision copy of W.

Decode-sized fp32 batches on CPU run dsinfer's packed-weight kernel, which reads each packed row once for
every row of x. The kernel also rounds x to int8 (one scale per 32 values) and multiplies in integers, as
llama.cpp does: 1.6x faster than unpacking int4 nibbles to fp32 (switch: KernelConfig.int8_activations, or
DSINFER_INT8_ACTIVATIONS=0, for the exact dequantize-then-matmul). Larger batches (prefill) dequantize a tile of
rows at a time and hand it to torch's matmul, so only one tile is ever in full precision. The plain path (kernels off, other devices) tiles the same way
with torch's own ops, and is what the tests compare the kernels against."""
import torch
import torch.nn.functional as F

from dsinfer import kernels
from dsinfer.quant.qtensor import QTensor

TILE_VALUES = 1 << 20  # weights per dequantized tile on CPU (4 MiB in fp32: stays in cache)
GPU_TILE_VALUES = 1 << 24  # on other devices larger tiles keep kernel launches few (64 MiB in fp32)


def qlinear(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None, use_kernels: bool = False,
            int8: int = 0) -> torch.Tensor:
    """use_kernels / int8: the model's KernelConfig.cpu_kernels and int8_kernel (0 off, 1 AVX2, 2 AVX-VNNI)."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    int8_x = int8 if int8 and use_kernels and int8_activations_fit(x, w) else 0
    if use_kernels and kernels.q_usable(x):
        y = kernels.qgemv(x, w.q, w.scales, w.mins, w.bits, w.group_size, int8_activations=int8_x)
    else:
        y = tiled(kernels.round_to_int8(x) if int8_x else x, w, use_kernels)
    return y if bias is None else y + bias


def int8_activations_fit(x: torch.Tensor, w: QTensor) -> bool:
    """Whether this matmul can multiply int8-rounded activations: fp32 x on CPU and a layout that allows it.
    Prefill tiles then round x the same way, so that a sequence gets the same numbers whether its rows ran in
    a decode batch or in a prefill."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and kernels.dequant_usable(w.q)
            and kernels.int8_activations_fit(w.bits, w.k, w.group_size))


def tiled(x: torch.Tensor, w: QTensor, use_kernels: bool = False) -> torch.Tensor:
    n, k = w.shape
    rows = max(16, (TILE_VALUES if x.device.type == "cpu" else GPU_TILE_VALUES) // k)
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    fast, buf = use_kernels and kernels.dequant_usable(w.q), None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if fast:  # one tile buffer for the whole matrix (the last, shorter tile gets its own)
            reuse = buf if buf is not None and buf.shape[0] == r1 - r0 else None
            tile = buf = kernels.dequant(w.q, w.scales, w.mins, w.bits, w.group_size, k, r0, r1, out=reuse)
        else:
            tile = w[r0:r1].dequantize()
        y[..., r0:r1] = F.linear(x, tile.to(x.dtype))
    return y
