"""x @ W.T for a quantized W (dsinfer.quant.qtensor.QTensor) without a full-precision copy of W.

Decode-sized fp32 batches on CPU run dsinfer's packed-weight kernel, which reads each packed row once for
every row of x. Larger batches (prefill) dequantize a tile of rows at a time and hand it to torch's matmul,
so only one tile is ever in full precision. The plain path (kernels off, other devices) tiles the same way
with torch's own ops, and is what the tests compare the kernels against."""
import torch
import torch.nn.functional as F

from dsinfer import kernels
from dsinfer.quant.qtensor import QTensor

TILE_VALUES = 1 << 20  # weights per dequantized tile on CPU (4 MiB in fp32: stays in cache)
GPU_TILE_VALUES = 1 << 24  # on other devices larger tiles keep kernel launches few (64 MiB in fp32)


def qlinear(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    if kernels.q_usable(x):
        y = kernels.qgemv(x, w.q, w.scales, w.mins, w.bits, w.group_size)
    else:
        y = tiled(x, w)
    return y if bias is None else y + bias


def tiled(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    n, k = w.shape
    rows = max(16, (TILE_VALUES if x.device.type == "cpu" else GPU_TILE_VALUES) // k)
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    fast = kernels.dequant_usable(w.q)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if fast:
            tile = kernels.dequant(w.q, w.scales, w.mins, w.bits, w.group_size, k, r0, r1)
        else:
            tile = w[r0:r1].dequantize()
        y[..., r0:r1] = F.linear(x, tile.to(x.dtype))
    return y
