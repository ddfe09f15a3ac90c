import torch
import torch.nn.functional as F
from torch import nn

from dsinfer import kernels
from dsinfer.layers.linear import linear

_chunk = {"tokens": 256}


def set_chunk_tokens(n: int | None):
    """Tokens per MLP pass (None or 0: all at once). A long prefill runs its MLPs in chunks of this many tokens,
    so the [T, 2I] intermediate, the largest activation in a forward pass, is bounded (as llama.cpp bounds its
    compute buffer by n_ubatch). Process-wide, like the CPU kernel switch."""
    if n is not None and n < 0:
        raise ValueError(f"ffn_chunk_tokens must be >= 0 or None, got {n}")
    _chunk["tokens"] = n or 0


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU MLP; gate_proj and up_proj are loaded into one [2I, D] matrix so they run as one matmul."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.empty(2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(hidden, inter))
        # a decode batch runs as the fused experts kernel's one expert, chosen by every token with weight 1
        self.register_buffer("only_expert", torch.zeros(kernels.MAX_M, 1, dtype=torch.long), persistent=False)
        self.register_buffer("unit_weight", torch.ones(kernels.MAX_M, 1, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decode batches run as the experts kernel's one expert, larger fp32 batches as the prefill kernel's
        (which bounds its own intermediate); the rest through `run`, in chunks."""
        if isinstance(self.gate_up_proj, torch.Tensor):
            gate_up, down, t = self.gate_up_proj[None], self.down_proj[None], x.shape[0]
            if t <= kernels.MAX_M and kernels.moe_usable(x, gate_up):
                return kernels.moe_decode(x, self.only_expert[:t], self.unit_weight[:t], gate_up, down)
            if kernels.moe_prefill_usable(x, gate_up):
                return kernels.moe_prefill(x, None, None, gate_up, down)
        step = _chunk["tokens"]
        if not step or x.shape[0] <= step:
            return self.run(x)
        return torch.cat([self.run(part) for part in x.split(step)])

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return linear(silu_and_mul(linear(x, self.gate_up_proj)), self.down_proj)

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        i = self.inter
        return {f"{prefix}gate_proj.weight": self.gate_up_proj.data[:i],
                f"{prefix}up_proj.weight": self.gate_up_proj.data[i:],
                f"{prefix}down_proj.weight": self.down_proj.data}
