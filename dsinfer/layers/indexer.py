"""DeepSeek-V3.2's lightning indexer: which cached tokens each query attends to.

Per token t, from the MLA query latent qr = q_a_layernorm(q_a_proj(x)) and the hidden state x:
    q[t, h] = wq_b(qr)[h]            (H heads of D values)        k[s] = LayerNorm(wk(x_s))   (one key of D)
    w[t, h] = weights_proj(x)[h] * H^-1/2 * D^-1/2
    score[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s]),  s <= t, and t keeps its index_topk best s.
The first qk_rope_head_dim values of q and k turn with rope in NeoX half-split style (DeepSeek's fixed release;
GLM-MoE-DSA turns interleaved pairs). DeepSeek also rotates q and k by a Hadamard matrix and scores them in FP8:
the rotation is orthogonal (q . k unchanged) and FP8 is a precision choice of theirs, so scores here are taken
in fp32 from fp32 or bf16 keys (the cache's keys are stored in the latent cache's dtype, bf16 for fp8). A bf16
model built with KernelConfig.dsa_bf16 takes q . k as bf16 matmuls instead (fp32 accumulation, each dot product
rounded to bf16 once, where DeepSeek rounds the inputs to FP8), relu and the head sum in fp32."""
import torch
import torch.nn.functional as F
from torch import nn

from dsinfer.config import ModelConfig
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers.linear import Linear
from dsinfer.layers.rope import apply_rope

QUERY_CHUNK_BYTES = 64 << 20  # bound on one chunk's [queries, heads, keys] fp32 products
BF16_CHUNK_BYTES = 4 << 20    # ... of the bf16 path's: small enough to stay in the caches between its passes


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, kc: KernelConfig = PLAIN, interleaved_rope: bool = False):
        super().__init__()
        self.h, self.d, self.dr, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim, cfg.index_topk
        self.interleaved, self.bf16 = interleaved_rope, kc.dsa_bf16
        self.wq_b = Linear(cfg.q_lora_rank, self.h * self.d, kc=kc)
        self.wk = Linear(cfg.hidden_size, self.d, kc=kc)
        self.k_norm = nn.LayerNorm(self.d, eps=1e-6)  # weight and bias, run in fp32
        self.weights_proj = Linear(cfg.hidden_size, self.h, kc=kc)
        self.scale = (self.h * self.d) ** -0.5

    def rope(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """Turns the first dr values of x [T, ..., D] by cis [T, dr / 2]."""
        pe, rest = x[..., :self.dr], x[..., self.dr:]
        if self.interleaved:
            return torch.cat([apply_rope(pe, cis), rest], -1)
        c = cis.view(cis.shape[0], *(1,) * (x.dim() - 2), cis.shape[-1])
        cos, sin = c.real.to(x.dtype), c.imag.to(x.dtype)
        a, b = pe.chunk(2, -1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], -1)

    def keys(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """Each new token's key [T, D], the row it caches."""
        n = self.k_norm
        k = F.layer_norm(self.wk(x).float(), (self.d,), n.weight.float(), n.bias.float(), n.eps)
        return self.rope(k.to(x.dtype), cis)

    def queries(self, x: torch.Tensor, qr: torch.Tensor, cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [T, H, D] roped, w [T, H] fp32 with both scales folded in)."""
        q = self.rope(self.wq_b(qr).view(-1, self.h, self.d), cis)
        return q, self.weights_proj(x).float() * self.scale

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Top-index_topk key positions [T, k] of one sequence's queries (q [T, H, D], w [T, H], at positions [T])
        among its keys [L, D] (position s at row s); k = min(index_topk, L). Where a query sees fewer than k
        keys, the extra picks are future positions (> its position) which the caller drops."""
        if self.bf16 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            return self.select_bf16(q, w, keys, positions)
        k = min(self.topk, keys.shape[0])
        step = max(1, QUERY_CHUNK_BYTES // (4 * self.h * keys.shape[0]))
        kf, cols = keys.float(), torch.arange(keys.shape[0], device=keys.device)
        out = []
        for s in range(0, q.shape[0], step):
            e = min(s + step, q.shape[0])
            dots = torch.einsum("thd,sd->ths", q[s:e].float(), kf).relu_()                 # [t, H, L]
            score = torch.bmm(w[s:e, None, :], dots).squeeze(1)                               # [t, L]
            score.masked_fill_(cols[None, :] > positions[s:e, None], float("-inf"))
            out.append(score.topk(k, dim=-1).indices)
        return torch.cat(out)

    def select_bf16(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
        """select for bf16 queries: q . k for a few queries at a time as one bf16 matmul (AMX here, about 3x
        torch's fp32 einsum at DeepSeek's shapes), relu and the w-weighted head sum in fp32; picks unsorted."""
        k = min(self.topk, keys.shape[0])
        step = max(1, BF16_CHUNK_BYTES // (2 * self.h * keys.shape[0]))
        kt, cols = keys.to(torch.bfloat16).T, torch.arange(keys.shape[0], device=keys.device)
        out = []
        for s in range(0, q.shape[0], step):
            e = min(s + step, q.shape[0])
            dots = torch.mm(q[s:e].reshape(-1, self.d), kt).relu_().view(e - s, self.h, -1)    # [t, H, L] bf16
            score = torch.bmm(w[s:e, None, :], dots.float()).squeeze(1)                        # [t, L]
            score.masked_fill_(cols[None, :] > positions[s:e, None], float("-inf"))
            out.append(score.topk(k, dim=-1, sorted=False).indices)
        return torch.cat(out)
