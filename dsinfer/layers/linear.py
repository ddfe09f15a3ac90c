import torch
import torch.nn.functional as F
from torch import nn

from dsinfer import kernels


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias). Decode-sized fp32 batches on CPU go through dsinfer's weight-streaming kernel when it
    is available and switched on; everything else through torch."""
    if kernels.usable(x, w):
        y = kernels.gemv(x, w)
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


class Linear(nn.Module):
    """A linear layer whose weight is left uninitialised: it is always filled from a checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
