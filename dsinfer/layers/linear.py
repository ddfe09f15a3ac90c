"""x @ W.T as a model's KernelConfig chose when it was built: `Matmul` holds that choice for the layers that
own weights (Linear, MLP, Experts, MLA, the LM head)."""
import torch
import torch.nn.functional as F
from torch import nn

from dsinfer import kernels
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers.quant_linear import qlinear
from dsinfer.quant.qtensor import QTensor


class Matmul:
    """x @ w.T (+ bias). Quantized weights go through qlinear. With the CPU kernels, decode-sized fp32 batches
    go through the weight-streaming kernel, and batches of up to kernels.SMALL_MAX_M rows (a prefill's
    per-expert matmuls) through the small-GEMM kernel if that is on (quantized weights: qlinear's decode kernel,
    MAX_M rows at a time); everything else through torch, which is also the whole of the plain path."""
    __slots__ = ("kernels", "small_gemm", "int8_activations", "bf16_tiles")

    def __init__(self, kc: KernelConfig = PLAIN):
        self.kernels, self.small_gemm, self.int8_activations = kc.cpu_kernels, kc.small_gemm, kc.int8_kernel
        self.bf16_tiles = kc.bf16_prefill_tiles

    def __call__(self, x: torch.Tensor, w: torch.Tensor | QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, QTensor):
            return qlinear(x, w, bias, self.kernels, self.int8_activations, self.bf16_tiles, self.small_gemm)
        if self.kernels and widened(x) and kernels.usable(x.float(), w):
            return self(x.float(), w, bias).to(x.dtype)  # 16-bit decode rows through the fp32-activation kernel
        if self.kernels and kernels.usable(x, w):
            y = kernels.gemv(x, w)
        elif self.small_gemm and kernels.small_usable(x, w):
            y = kernels.gemm_small(x, w)
        else:
            return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), bias)
        return y if bias is None else y + bias


def widened(x: torch.Tensor) -> bool:
    """Whether x is a decode-sized batch of 16-bit activations, which the kernels take widened to fp32 (torch's
    own 16-bit matmul of a few rows runs far below memory bandwidth on CPUs)."""
    return x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2 and 0 < x.shape[0] <= kernels.MAX_M


class Linear(nn.Module):
    """A linear layer whose weight is left uninitialised: it is always filled from a checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, kc: KernelConfig = PLAIN):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.matmul = Matmul(kc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)
