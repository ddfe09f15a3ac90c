import torch
import torch.nn.functional as F
from torch import nn

from dsinfer import kernels
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers.linear import Matmul, widened


def silu_and_mul(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for x [T, 2I] = (gate | up), times scale [T] (the routing weights) if given."""
    gate, up = x.chunk(2, dim=-1)
    h = F.silu(gate) * up
    return h if scale is None else h.mul_(scale.reshape(-1, 1).to(h.dtype))


def fused_silu_and_mul(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul in one C pass where x is bf16 on CPU (computed in fp32, rounded once), else silu_and_mul."""
    if kernels.silu_mul_usable(x):
        return kernels.silu_mul(x, None if scale is None else scale.reshape(-1).float())
    return silu_and_mul(x, scale)


def swiglu(kc: KernelConfig):
    """The SwiGLU activation a model built with kc runs (KernelConfig.fused_swiglu)."""
    return fused_silu_and_mul if kc.fused_swiglu else silu_and_mul


class MLP(nn.Module):
    """SwiGLU MLP; gate_proj and up_proj are loaded into one [2I, D] matrix so they run as one matmul."""

    def __init__(self, hidden: int, inter: int, kc: KernelConfig = PLAIN):
        super().__init__()
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.empty(2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(hidden, inter))
        self.matmul, self.decode_kernel, self.prefill_kernel = Matmul(kc), kc.cpu_kernels, kc.moe_prefill
        self.activation = swiglu(kc)
        self.chunk_tokens = kc.ffn_chunk_tokens  # bounds the [T, 2I] intermediate, as llama.cpp's n_ubatch does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decode batches run in the decode kernel, larger fp32 batches in the prefill kernel (which bounds its
        own intermediate); the rest through `run`, in chunks of chunk_tokens."""
        gate_up, plain = self.gate_up_proj, isinstance(self.gate_up_proj, torch.Tensor)  # not quantized
        if plain and self.decode_kernel and widened(x):
            return self(x.float()).to(x.dtype)
        if plain and self.decode_kernel and x.shape[0] <= kernels.MAX_M and kernels.moe_usable(x, gate_up[None]):
            return kernels.mlp_decode(x, gate_up, self.down_proj)
        if plain and self.prefill_kernel and kernels.moe_prefill_usable(x, gate_up[None]):
            return kernels.moe_prefill(x, None, None, gate_up[None], self.down_proj[None])
        step = self.chunk_tokens
        if not step or x.shape[0] <= step:
            return self.run(x)
        return torch.cat([self.run(part) for part in x.split(step)])

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(self.activation(self.matmul(x, self.gate_up_proj)), self.down_proj)

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        i = self.inter
        return {f"{prefix}gate_proj.weight": self.gate_up_proj.data[:i],
                f"{prefix}up_proj.weight": self.gate_up_proj.data[i:],
                f"{prefix}down_proj.weight": self.down_proj.data}
