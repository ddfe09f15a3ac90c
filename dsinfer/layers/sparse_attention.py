"""Attention over a chosen subset of each query's cached tokens: only those latent rows are gathered from the
cache, and attention runs absorbed over them (scores against the latent, output formed in latent space), for
prefill chunks and decodes alike. IndexedMLA is MLA with DeepSeek-V3.2's indexer choosing the subset."""
import torch

from dsinfer import kernels
from dsinfer.config import ModelConfig
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers import kv_format
from dsinfer.layers.attention import MLA, AttentionMetadata
from dsinfer.layers.indexer import Indexer
from dsinfer.layers.rope import RotaryEmbedding

GATHER_CHUNK_BYTES = 64 << 20  # bound on one chunk of queries' gathered rows


def gathered_attention(qc: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, cache: torch.Tensor, r: int,
                       scale: float) -> torch.Tensor:
    """softmax(scale * qc . c_j) . c_j[:r] over the rows j each query keeps. qc [T, H, r + dr] (absorbed
    queries), rows [T, K] cache rows, valid [T, K] which of them count. Returns [T, H, r]."""
    step = max(1, GATHER_CHUNK_BYTES // (4 * rows.shape[1] * qc.shape[-1]))
    out = []
    for s in range(0, qc.shape[0], step):
        e = min(s + step, qc.shape[0])
        ctx = kv_format.read_rows(cache, rows[s:e], r, qc.dtype)                          # [t, K, r + dr]
        scores = torch.bmm(qc[s:e], ctx.transpose(1, 2)).float() * scale                  # [t, H, K]
        probs = scores.masked_fill_(~valid[s:e, None, :], float("-inf")).softmax(-1).to(qc.dtype)
        out.append(torch.bmm(probs, ctx[..., :r]))
    return out[0] if len(out) == 1 else torch.cat(out)


def gathered_attention_bf16(qc: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, cache: torch.Tensor, r: int,
                            scale: float) -> torch.Tensor:
    """gathered_attention for bf16 queries, one query at a time: its kept rows [K, r + dr] (2.4 MB at DeepSeek's
    shapes, so they stay in the core's cache), read in cache order, meet its heads in two bf16 matmuls (AMX, fp32
    accumulation), the softmax in fp32; the mask only where some pick does not count. Every query reuses the same
    buffers (no page faults for fresh megabytes). About 1.5-2x the batched form's speed here, whose [t, K, r + dr]
    gathers and strided batched matmuls run from memory."""
    order = rows.argsort(1)
    rows, valid = rows.gather(1, order), valid.gather(1, order)
    h, k = qc.shape[1], rows.shape[1]
    out = qc.new_empty(qc.shape[0], h, r)
    s16, s32, probs = qc.new_empty(h, k), torch.empty(h, k, device=qc.device), qc.new_empty(h, k)
    same = cache.dtype == qc.dtype  # else each query's rows are converted (fp8, or an fp32 cache)
    ctx = cache.new_empty(k, cache.shape[1]) if same else None
    for i, full in enumerate(valid.all(1).tolist()):
        if same:
            torch.index_select(cache, 0, rows[i], out=ctx)                                 # [K, r + dr]
        else:
            ctx = kv_format.read_rows(cache, rows[i], r, qc.dtype)
        torch.mm(qc[i], ctx.T, out=s16)                                                    # [H, K]
        s32.copy_(s16).mul_(scale)
        if not full:
            s32.masked_fill_(~valid[i], float("-inf"))
        probs.copy_(torch.softmax(s32, -1, out=s32))
        torch.mm(probs, ctx[:, :r], out=out[i])
    return out


def with_kernels(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor) -> bool:
    """Decode-sized fp32 steps absorb and expand through the C kernels MLA's absorbed decode uses (torch's
    batched matmuls of one row per head run far below the weight-reading speed)."""
    return (mla.kernels and q_nope.shape[0] <= kernels.MAX_M
            and kernels.absorb_usable(q_nope, q_pe, mla.kv_b_proj.weight))


def absorb(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
    """Queries in latent space (see MLA.absorbed): [T, H, r + dr]."""
    if with_kernels(mla, q_nope, q_pe):
        return kernels.mla_absorb(q_nope, q_pe, mla.kv_b_proj.weight, mla.r, mla.dv)
    w = mla.kv_b_proj.weight.view(mla.h, mla.dn + mla.dv, mla.r)
    return torch.cat([torch.bmm(q_nope.transpose(0, 1), w[:, :mla.dn]).transpose(0, 1), q_pe], -1)


def absorbed_sparse(mla: MLA, qc, rows, valid, cache, dsa_bf16: bool = False) -> torch.Tensor:
    """MLA's absorbed attention over the kept rows only, from absorbed queries qc: [T, H, dv]. dsa_bf16: bf16
    queries on a CPU take gathered_attention_bf16."""
    bf16 = dsa_bf16 and qc.dtype == torch.bfloat16 and qc.device.type == "cpu"
    o_lat = (gathered_attention_bf16 if bf16 else gathered_attention)(qc, rows, valid, cache, mla.r, mla.scale)
    if with_kernels(mla, qc, qc):
        return kernels.mla_expand(o_lat.contiguous(), mla.kv_b_proj.weight, mla.dn, mla.dv)
    w = mla.kv_b_proj.weight.view(mla.h, mla.dn + mla.dv, mla.r)
    return torch.bmm(o_lat.transpose(0, 1), w[:, mla.dn:].transpose(1, 2)).transpose(0, 1)


def to_rows(picks: list[torch.Tensor], positions: torch.Tensor, meta: AttentionMetadata):
    """Per-sequence picked positions ([n_i, k_i] each) -> (cache rows [T, K], valid [T, K]): padded to the
    widest k with -1; a pick counts when it is a real position no later than its query's."""
    width = max(p.shape[1] for p in picks)
    idx = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in picks])
    valid = (idx >= 0) & (idx <= positions[:, None])
    rows = meta.gather_index[meta.token_seq[:, None], idx.clamp(min=0)]
    return rows, valid


class IndexedMLA(MLA):
    """MLA whose every query attends to the index_topk cached tokens the indexer ranks highest. Indexer keys
    are written to their own cache (index_cache, one row per cache slot, beside the latent). While no sequence of
    a step has more than index_topk tokens, every token is kept, so the dense path runs and gives the same bits.
    A layer built with own_indexer=False (GLM-MoE-DSA's "shared" layers) has no indexer: it attends to what the
    layer given as `source` picked in the same step. use_indexer=False runs dense attention over the same
    weights (for comparison)."""

    def __init__(self, cfg: ModelConfig, mode: str = "auto", rotary: RotaryEmbedding | None = None,
                 kc: KernelConfig = PLAIN, own_indexer: bool = True):
        super().__init__(cfg, mode, rotary, kc)
        self.topk, self.dsa_bf16 = cfg.index_topk, kc.dsa_bf16
        self.indexer = Indexer(cfg, kc, cfg.interleaved_index_rope) if own_indexer else None
        self.use_indexer, self.source, self.picked = True, (), None

    def share(self, source: "IndexedMLA"):
        self.source = (source,)  # a tuple, so that its weights are not this layer's too

    def forward(self, x, positions, meta: AttentionMetadata, cache: tuple[torch.Tensor, torch.Tensor]):
        latent, index = cache
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(-1, self.h, self.dn + self.dr)
        cis = self.rotary.rotation(positions)
        q_nope, q_pe = self.rope_and_cache(q, self.kv_a_proj_with_mqa(x), cis, latent, meta.slot_mapping)
        if self.indexer is not None:
            index.index_copy_(0, meta.slot_mapping, self.indexer.keys(x, cis).to(index.dtype))
        if not self.use_indexer or max(meta.context_lens) <= self.topk:
            return self.o_proj(self.dense(q_nope, q_pe, positions, meta, latent).flatten(1))
        if self.indexer is not None:
            self.picked = to_rows(self.pick(x, qr, cis, positions, meta, index), positions, meta)
        rows, valid = self.picked if self.indexer is not None else self.source[0].picked
        o = absorbed_sparse(self, absorb(self, q_nope, q_pe), rows, valid, latent, self.dsa_bf16)
        return self.o_proj(o.flatten(1))

    def pick(self, x, qr, cis, positions, meta, index) -> list[torch.Tensor]:
        """The indexer's top-k positions for each sequence's new tokens."""
        q, w = self.indexer.queries(x, qr, cis)
        picks, start = [], 0
        for i, (ql, cl) in enumerate(zip(meta.query_lens, meta.context_lens)):
            keys = index.index_select(0, meta.gather_index[i, :cl])                        # [cl, D]
            end = start + ql
            picks.append(self.indexer.select(q[start:end], w[start:end], keys, positions[start:end]))
            start = end
        return picks
