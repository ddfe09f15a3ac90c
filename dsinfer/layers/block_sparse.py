"""Training-free sparse attention for models without an indexer (DeepSeek-V2 / V3 checkpoints).

Each query at position p attends to
- the first `sink` tokens (attention sinks),
- a local window of the last `window` tokens (p - window + 1 .. p),
- the `topk_blocks` cache blocks of the rest (positions sink .. p - window) whose summary scores highest against
  the query: a block's summary is the mean of its cached latent rows (normalized latent and roped key), kept up
  to date as the block fills, and its score is the largest over heads of the absorbed query's dot product with it.
Only the kept latent rows are gathered (layers/sparse_attention.py). While every query of a step can keep all
of its context, the dense path runs, so short contexts give exactly dense attention."""
from dataclasses import dataclass, fields

import torch

from dsinfer.config import ModelConfig
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers import kv_format
from dsinfer.layers.attention import MLA, AttentionMetadata
from dsinfer.layers.rope import RotaryEmbedding
from dsinfer.layers.sparse_attention import absorb, absorbed_sparse, to_rows

SCORE_CHUNK_BYTES = 64 << 20  # bound on one chunk of queries' [queries, heads, blocks] scores


@dataclass(slots=True, frozen=True)
class SparseConfig:
    sink: int = 16          # first tokens every query keeps
    window: int = 256       # last tokens every query keeps, itself included (>= 1)
    topk_blocks: int = 16   # cache blocks kept from the rest, by summary score

    @classmethod
    def from_dict(cls, d: dict) -> "SparseConfig":
        if not isinstance(d, dict):
            raise ValueError(f"sparse_attention must be a dict of {[f.name for f in fields(cls)]}, got {d!r}")
        names = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - names):
            raise ValueError(f"unknown sparse_attention field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        for k, v in d.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if k == "window" else 0):
                raise ValueError(f"sparse_attention.{k} must be an integer >= {1 if k == 'window' else 0}, got {v!r}")
        return cls(**d)

    def candidates(self, p: int, bs: int) -> int:
        """Blocks holding a position in sink .. p - window: those a query at p chooses among."""
        last = p - self.window
        return 0 if last < self.sink else last // bs - self.sink // bs + 1

    def keeps_all(self, context: int, bs: int) -> bool:
        """Whether every query of a sequence of `context` tokens keeps its whole context."""
        return self.candidates(context - 1, bs) <= self.topk_blocks


def update_summaries(latent: torch.Tensor, summary: torch.Tensor, slots: torch.Tensor, r: int):
    """After a step writes `slots`, each touched block's summary becomes the mean of its rows so far: a sequence
    writes a block in position order, so the last offset written is its fill."""
    bs = latent.shape[0] // summary.shape[0]
    blocks, inverse = (slots // bs).unique(return_inverse=True)
    filled = torch.zeros_like(blocks).scatter_reduce_(0, inverse, slots % bs + 1, "amax")
    write_summaries(latent, summary, blocks, filled, r)


def write_summaries(latent, summary, blocks: torch.Tensor, filled: torch.Tensor, r: int):
    bs = latent.shape[0] // summary.shape[0]
    offsets = torch.arange(bs, device=latent.device)
    rows = kv_format.read_rows(latent, blocks[:, None] * bs + offsets, r, torch.float32)   # [n, bs, r + dr]
    keep = (offsets[None, :] < filled[:, None]).float()
    summary[blocks] = (torch.bmm(keep[:, None, :], rows).squeeze(1) / filled[:, None]).to(summary.dtype)


class BlockSparseMLA(MLA):
    def __init__(self, cfg: ModelConfig, mode: str, rotary: RotaryEmbedding | None, kc: KernelConfig = PLAIN,
                 sparse: SparseConfig = SparseConfig()):
        super().__init__(cfg, mode, rotary, kc)
        self.sparse = sparse

    def forward(self, x, positions, meta: AttentionMetadata, cache: tuple[torch.Tensor, torch.Tensor]):
        latent, summary = cache
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(-1, self.h, self.dn + self.dr)
        cis = self.rotary.rotation(positions)
        q_nope, q_pe = self.rope_and_cache(q, self.kv_a_proj_with_mqa(x), cis, latent, meta.slot_mapping)
        update_summaries(latent, summary, meta.slot_mapping, self.r)
        bs = latent.shape[0] // summary.shape[0]
        if self.sparse.keeps_all(max(meta.context_lens), bs):
            return self.o_proj(self.dense(q_nope, q_pe, positions, meta, latent).flatten(1))
        qc = absorb(self, q_nope, q_pe)
        rows, valid = to_rows(self.pick(qc, positions, meta, summary, bs), positions, meta)
        return self.o_proj(absorbed_sparse(self, qc, rows, valid, latent).flatten(1))

    def pick(self, qc, positions, meta, summary, bs: int) -> list[torch.Tensor]:
        """Kept positions of each sequence's queries, [n, sink + window + topk_blocks * bs], -1 where not kept."""
        picks, start = [], 0
        for i, (ql, cl) in enumerate(zip(meta.query_lens, meta.context_lens)):
            blocks = meta.gather_index[i, :cl:bs] // bs                                        # [nb] block ids
            summ = summary[blocks].float()
            step = max(1, SCORE_CHUNK_BYTES // (4 * self.h * len(blocks)))
            for s in range(start, start + ql, step):
                e = min(s + step, start + ql)
                picks.append(self.keep(qc[s:e], positions[s:e], summ, bs))
            start += ql
        return picks

    def keep(self, qc, pos, summ, bs: int) -> torch.Tensor:
        sp, dev = self.sparse, qc.device
        nb = summ.shape[0]
        score = torch.einsum("thw,bw->thb", qc.float(), summ).amax(1)                          # [n, nb]
        first = torch.arange(nb, device=dev) * bs
        middle = pos[:, None] - sp.window                                                       # last middle position
        score.masked_fill_(~((first[None, :] + bs > sp.sink) & (first[None, :] <= middle)), float("-inf"))
        top = score.topk(min(sp.topk_blocks, nb), dim=-1)
        at = (top.indices[:, :, None] * bs + torch.arange(bs, device=dev)).flatten(1)           # [n, k * bs]
        ok = top.values.isfinite().repeat_interleave(bs, 1) & (at >= sp.sink) & (at <= middle)
        sink = torch.arange(sp.sink, device=dev).expand(len(pos), -1)
        window = pos[:, None] - sp.window + 1 + torch.arange(sp.window, device=dev)
        window = window.masked_fill(window < sp.sink, -1)                                      # sinks count once
        return torch.cat([sink, window, at.masked_fill(~ok, -1)], 1)
