import torch
import torch.nn.functional as F
from torch import nn

from dsinfer import kernels
from dsinfer.layers.quant_linear import qlinear
from dsinfer.quant.qtensor import QTensor

RECORDERS = []  # calibration hooks (dsinfer.quant.calibrate), called with (x, w) before each matmul


def linear(x: torch.Tensor, w: torch.Tensor | QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias). Quantized weights go through qlinear; decode-sized fp32 batches on CPU go through
    dsinfer's weight-streaming kernel when it is available and switched on, and fp32 batches of up to
    kernels.SMALL_MAX_M rows (a prefill's per-expert matmuls) through its small-GEMM kernel; everything else
    through torch."""
    for record in RECORDERS:
        record(x, w)
    if isinstance(w, QTensor):
        return qlinear(x, w, bias)
    if kernels.usable(x, w):
        y = kernels.gemv(x, w)
        return y if bias is None else y + bias
    if kernels.small_usable(x, w):
        y = kernels.gemm_small(x, w)
        return y if bias is None else y + bias
    return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), bias)


class Linear(nn.Module):
    """A linear layer whose weight is left uninitialised: it is always filled from a checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
