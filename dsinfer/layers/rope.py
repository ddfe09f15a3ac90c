"""Rotary embedding on MLA's rope slice: interleaved pairs (x0, x1), (x2, x3), ... with optional YaRN."""
import math

import torch
from torch import nn


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

    def cos_sin(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq  # [T, dim/2]
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, ..., dim] in interleaved pairs; cos/sin: [T, dim/2]."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


def softmax_scale(head_dim: int, scaling: dict | None) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 when YaRN is on (DeepSeek's definition)."""
    scale = head_dim ** -0.5
    if scaling and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale
