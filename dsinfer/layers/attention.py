"""Multi-head latent attention (MLA) over a cache that holds only the latent and the shared roped key."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsinfer import kernels
from dsinfer.config import ModelConfig
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers import kv_format
from dsinfer.layers.linear import Linear
from dsinfer.layers.norm import RMSNorm
from dsinfer.layers.rope import RotaryEmbedding, apply_rope, fast_apply_rope, softmax_scale

MLA_MODES = ("auto", "absorbed", "decompressed")


@dataclass(slots=True)
class AttentionMetadata:
    """Where a step's tokens go in the cache and what each sequence attends to. Sequences with several new
    tokens (prefill chunks) come first; the rest have one new token each (decodes)."""
    num_prefills: int          # leading sequences with more than one new token
    num_prefill_tokens: int
    query_lens: list[int]      # new tokens per sequence
    context_lens: list[int]    # cached + new tokens per sequence
    slot_mapping: torch.Tensor  # [T] cache row written by each new token
    gather_index: torch.Tensor  # [B, max context] cache rows of each sequence, position by position
    token_seq: torch.Tensor     # [T] which sequence each token belongs to


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, mode: str = "auto", rotary: RotaryEmbedding | None = None,
                 kc: KernelConfig = PLAIN):
        super().__init__()
        self.h, self.dn, self.dr, self.dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.r, self.mode, self.kernels = cfg.kv_lora_rank, mode, kc.cpu_kernels
        qk = self.dn + self.dr
        b, eps = cfg.attention_bias, cfg.rms_norm_eps
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=b, kc=kc)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps, kc)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.h * qk, bias=False, kc=kc)
        else:
            self.q_proj = Linear(cfg.hidden_size, self.h * qk, bias=False, kc=kc)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.r + self.dr, bias=b, kc=kc)
        self.kv_a_layernorm = RMSNorm(self.r, eps, kc)
        self.kv_b_proj = Linear(self.r, self.h * (self.dn + self.dv), bias=False, kc=kc)
        self.o_proj = Linear(self.h * self.dv, cfg.hidden_size, bias=b, kc=kc)
        self.rotary = rotary or RotaryEmbedding(self.dr, cfg.rope_theta, cfg.rope_scaling)  # shared by the layers
        self.scale = softmax_scale(qk, cfg.rope_scaling)
        self.rope = fast_apply_rope if kc.cpu_kernels else apply_rope

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(-1, self.h, self.dn + self.dr)
        kv = self.kv_a_proj_with_mqa(x)
        q_nope, q_pe = self.rope_and_cache(q, kv, self.rotary.rotation(positions), cache, meta.slot_mapping)
        return self.o_proj(self.dense(q_nope, q_pe, positions, meta, cache).flatten(1))

    def dense(self, q_nope, q_pe, positions, meta, cache) -> torch.Tensor:
        """Attention over every cached position of each sequence, in the bound mode: [T, H, dv]."""
        if self.mode == "decompressed":
            return self.decompressed(q_nope, q_pe, meta, cache, len(meta.query_lens))
        if self.mode == "absorbed":
            return self.absorbed(q_nope, q_pe, positions, meta.gather_index, meta.token_seq, cache)
        return self.mixed(q_nope, q_pe, positions, meta, cache)

    def rope_and_cache(self, q, kv, cis, cache, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """Turns the rope parts of q and of the new keys, and writes each new token's cache row: the normalized
        latent and the turned shared key. Returns q's two parts, (nope [T, H, dn], roped [T, H, dr])."""
        norm = self.kv_a_layernorm
        fused = self.kernels and q.is_contiguous() and kv.is_contiguous()
        if fused and kernels.fused_usable(q, kv, norm.weight) and cache.device.type == "cpu":
            if cache.dtype == torch.float32:
                kernels.mla_rope_cache(q, kv, norm.weight, norm.eps, cis, cache, slots, self.dn)  # one call
            else:  # fp32 rows first, then stored in the cache's format, as the fused decode layer does
                fresh, at = torch.empty(q.shape[0], self.r + self.dr), torch.arange(q.shape[0])
                kernels.mla_rope_cache(q, kv, norm.weight, norm.eps, cis, fresh, at, self.dn)
                kv_format.write_rows(cache, slots, fresh[:, :self.r], fresh[:, self.r:])
            return q[..., :self.dn], q[..., self.dn:]
        latent, k_pe = kv.split([self.r, self.dr], dim=-1)
        kv_format.write_rows(cache, slots, norm(latent), self.rope(k_pe, cis))
        return q[..., :self.dn], self.rope(q[..., self.dn:], cis)

    def mixed(self, q_nope, q_pe, positions, meta, cache) -> torch.Tensor:
        """Prefill chunks decompress (cheaper for many queries), decodes run absorbed (reads only the latent)."""
        p, t = meta.num_prefills, meta.num_prefill_tokens
        if not p:  # decodes only
            return self.absorbed(q_nope, q_pe, positions, meta.gather_index, meta.token_seq, cache)
        parts = []
        if p:
            parts.append(self.decompressed(q_nope[:t], q_pe[:t], meta, cache, p))
        if t < q_nope.shape[0]:
            parts.append(self.absorbed(q_nope[t:], q_pe[t:], positions[t:], meta.gather_index[p:],
                                       meta.token_seq[t:] - p, cache))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def decompressed(self, q_nope, q_pe, meta, cache, num_seqs: int) -> torch.Tensor:
        """Prefill: expand each sequence's cached latent into per-head K and V, then ordinary attention."""
        q = torch.cat([q_nope, q_pe], -1)
        out, start = [], 0
        for i, (ql, cl) in enumerate(zip(meta.query_lens[:num_seqs], meta.context_lens)):
            ctx = kv_format.read_rows(cache, meta.gather_index[i, :cl], self.r, q.dtype)  # [L, r + dr]
            kv = F.linear(ctx[:, :self.r], self.kv_b_proj.weight).view(cl, self.h, -1)
            k = torch.cat([kv[..., :self.dn], ctx[:, None, self.r:].expand(cl, self.h, self.dr)], -1)
            qi, v = q[start:start + ql].transpose(0, 1), kv[..., self.dn:].transpose(0, 1)  # [H, ql, dn + dr]
            if self.kernels and q.is_cpu and q.dtype in (torch.float32, torch.bfloat16):  # bf16: in fp32, as SDPA
                o = causal_blocks(qi.float(), k.transpose(0, 1).float(), v.float(), self.scale).to(q.dtype)
            else:
                mask = None if ql == cl else _causal_mask(ql, cl, q.device)
                o = F.scaled_dot_product_attention(qi, k.transpose(0, 1), v, attn_mask=mask,
                                                   is_causal=mask is None and ql > 1, scale=self.scale)
            out.append(o.transpose(0, 1))
            start += ql
        return torch.cat(out)

    def absorbed(self, q_nope, q_pe, positions, gather_index, token_seq, cache) -> torch.Tensor:
        """Decode without expanding the cache. With W_kb = [W_uk; W_uv] per head (kv_b_proj),
        q_nope . (W_uk c) = (W_uk^T q_nope) . c, so scores are taken against the latent c directly,
        and the output sum_j p_j W_uv c_j = W_uv (sum_j p_j c_j) is formed in latent space first."""
        wkv = self.kv_b_proj.weight
        if self.kernels and kernels.mla_usable(q_nope, cache) and kernels.absorb_usable(q_nope, q_pe, wkv):
            qc = kernels.mla_absorb(q_nope, q_pe, wkv, self.r, self.dv)  # each token alone: batch-invariant bits
            o_lat = kernels.mla_decode(qc, cache, gather_index, token_seq, positions + 1, self.scale, self.r)
            return kernels.mla_expand(o_lat, wkv, self.dn, self.dv)
        w = wkv.view(self.h, self.dn + self.dv, self.r)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w[:, :self.dn]).transpose(0, 1)      # [T, H, r]
        qc = torch.cat([q_lat, q_pe], -1)                                               # [T, H, r + dr]
        o_lat = self.latent_attention(qc, positions, gather_index, token_seq, cache)
        return torch.bmm(o_lat.transpose(0, 1), w[:, self.dn:].transpose(1, 2)).transpose(0, 1)

    def latent_attention(self, qc, positions, gather_index, token_seq, cache) -> torch.Tensor:
        """softmax(scale * qc . c_j) over each token's positions, applied to the latents: [T, H, r]."""
        ctx = kv_format.read_rows(cache, gather_index, self.r, qc.dtype)                # [B, L, r + dr]
        if ctx.shape[0] != qc.shape[0]:
            ctx = ctx[token_seq]
        scores = torch.bmm(ctx, qc.transpose(1, 2)).transpose(1, 2).float() * self.scale  # [T, H, L]
        future = torch.arange(ctx.shape[1], device=qc.device)[None, :] > positions[:, None]
        probs = scores.masked_fill(future[:, None, :], float("-inf")).softmax(-1).to(qc.dtype)
        return torch.bmm(probs, ctx[..., :self.r])                                      # [T, H, r]


def causal_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block: int = 128) -> torch.Tensor:
    """Causal attention of q [H, ql, d] (the last ql of the cl positions of k [H, cl, d] and v [H, cl, dv]) in
    blocks of queries, each against only the keys it can see: about half the products of a full square for a
    whole prompt, and scores bounded to [H, block, cl]. On CPU, torch's SDPA runs MLA's unequal q / v head dims
    through its unfused path, which computes all the products and builds the mask in several passes (and for bf16
    inputs computes in fp32 anyway, which is why bf16 callers pass fp32 here)."""
    ql, past, out = q.shape[1], k.shape[1] - q.shape[1], []
    for s in range(0, ql, block):
        e = min(s + block, ql)
        seen = past + e                                                               # keys of the last query
        scores = torch.bmm(q[:, s:e], k[:, :seen].transpose(1, 2)).mul_(scale)        # [H, e - s, seen]
        future = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).triu_(1)
        scores[:, :, past + s:].masked_fill_(future, float("-inf"))
        out.append(torch.bmm(scores.softmax(-1), v[:, :seen]))
    return out[0] if len(out) == 1 else torch.cat(out, 1)


def rows(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache[index] for an index of any shape; index_select is several times faster than advanced indexing."""
    return cache.index_select(0, index.reshape(-1)).view(*index.shape, cache.shape[1])


def _causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """Queries are the last q_len of k_len positions; query i sees keys up to k_len - q_len + i."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos
