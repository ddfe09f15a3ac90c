import torch
import torch.nn.functional as F
from torch import nn

from dsinfer import kernels
from dsinfer.kernels import PLAIN, KernelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, kc: KernelConfig = PLAIN):
        super().__init__()
        self.eps, self.fused = eps, kc.cpu_kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:  # the same math as below, fused
            if self.fused and x.dim() == 2 and x.stride(-1) == 1 and kernels.fused_usable(x, self.weight):
                return kernels.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        if self.fused and x.dim() == 2 and kernels.rms_norm_bf16_usable(x, self.weight):
            return kernels.rms_norm_bf16(x, self.weight, self.eps)  # the same math as below, in one pass
        xf = x.float()  # 16-bit: normalise in fp32, round, then scale, as transformers does
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
