"""Rotary embedding on MLA's rope slice: interleaved pairs (x0, x1), (x2, x3), ... with optional YaRN."""
import math

import torch
from torch import nn

from dsinfer import kernels


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, base: float, s: dict) -> torch.Tensor:
    """YaRN: keep high frequencies (extrapolate), divide low ones by `factor` (interpolate), and ramp
    linearly between the dims that turn beta_fast and beta_slow times over the original context."""
    factor, orig = s["factor"], s["original_max_position_embeddings"]

    def dim_for(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for(s.get("beta_fast") or 32)), 0)
    high = min(math.ceil(dim_for(s.get("beta_slow") or 1)), dim - 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low or 1e-3)).clamp(0, 1)
    return 1.0 / (factor * pos_freqs) * ramp + 1.0 / pos_freqs * (1 - ramp)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float, scaling: dict | None):
        super().__init__()
        if scaling:
            inv_freq = yarn_inv_freq(dim, base, scaling)
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            f = scaling["factor"]
            self.attention_factor = yarn_mscale(f, m) / yarn_mscale(f, m_all) if m and m_all else yarn_mscale(f)
        else:
            inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
            self.attention_factor = 1.0
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._last = None
        self._table = None  # CPU: turns of positions 0 .. len - 1, grown on demand

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """The turn of every interleaved pair at each position as a complex number [T, dim/2], scaled by the
        attention factor. Every layer asks for the same positions within a step, so the last answer is kept. On
        the CPU the turns are looked up in a table of every position seen so far (the same numbers: each is
        computed alone), one indexing op in place of several."""
        if self._last is not None and self._last[0] is positions:
            return self._last[1]
        cis = self.lookup(positions) if positions.device.type == "cpu" else self.turns(positions)
        self._last = (positions, cis)
        return cis

    def turns(self, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions[:, None].float() * self.inv_freq
        return torch.polar(torch.full_like(freqs, self.attention_factor), freqs)

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        if self._table is not None:
            try:
                return self._table[positions]
            except IndexError:  # a position past the table: grow it below
                pass
        seen = self._table.shape[0] if self._table is not None else 0
        size = max(1024, 2 * seen, int(positions.max()) + 1 if positions.numel() else 0)
        self._table = self.turns(torch.arange(size, device=positions.device))
        return self._table[positions]


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """x: [T, ..., dim] in interleaved pairs (x0, x1) read as x0 + i x1; cis: [T, dim/2] complex. 16-bit x turns
    in its own precision with cos and sin rounded to it, as transformers does."""
    cis = cis.view(cis.shape[0], *(1,) * (x.dim() - 2), cis.shape[-1])
    if x.dtype != torch.float32:
        cos, sin = cis.real.to(x.dtype), cis.imag.to(x.dtype)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    if pairs.stride(-2) != 2 or any(s % 2 for s in pairs.stride()[:-2]):
        pairs = pairs.contiguous()
    return torch.view_as_real(torch.view_as_complex(pairs) * cis).flatten(-2)


def fast_apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """apply_rope, with bf16 CPU rows in one C pass (the same bits; KernelConfig.cpu_kernels binds it)."""
    if kernels.rope_bf16_usable(x) and cis.shape == (x.shape[0], x.shape[-1] // 2):
        return kernels.rope_bf16(x, cis)
    return apply_rope(x, cis)


def softmax_scale(head_dim: int, scaling: dict | None) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 when YaRN is on (DeepSeek's definition)."""
    scale = head_dim ** -0.5
    if scaling and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale
