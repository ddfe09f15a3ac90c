"""Turns a batch of sequences into the model's flat inputs, runs it, and returns logits."""
import torch

from dsinfer.engine.kv_cache import KVCache
from dsinfer.engine.sequence import Sequence
from dsinfer.layers.attention import AttentionMetadata


class ModelRunner:
    def __init__(self, model, cache: KVCache):
        self.model, self.cache, self.device = model, cache, cache.device

    def prepare(self, seqs: list[Sequence], is_prefill: bool):
        bs = self.cache.block_size
        starts = [s.num_cached if is_prefill else len(s) - 1 for s in seqs]
        ends = [len(s) for s in seqs]
        for s, end in zip(seqs, ends):
            self.cache.reserve(s, end)
        tables = _pad([s.block_table for s in seqs])
        positions = torch.cat([torch.arange(a, b) for a, b in zip(starts, ends)])
        token_seq = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([b - a for a, b in zip(starts, ends)]))
        slots = tables[token_seq, positions // bs] * bs + positions % bs
        cols = torch.arange(max(ends))
        gather = tables[:, cols // bs] * bs + cols % bs
        ids = [t for s, a in zip(seqs, starts) for t in s.token_ids[a:]]
        to = lambda t: t.to(self.device, non_blocking=True)
        meta = AttentionMetadata(is_prefill, [b - a for a, b in zip(starts, ends)], ends, to(slots), to(gather),
                                 to(token_seq))
        return to(torch.tensor(ids)), to(positions), meta

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, all_positions: list[bool] | None = None) -> list[torch.Tensor]:
        """Logits [n, vocab] per sequence: every new position where `all_positions` asks, else the last one."""
        input_ids, positions, meta = self.prepare(seqs, is_prefill)
        hidden = self.model(input_ids, positions, meta, self.cache.layers)
        ends = torch.tensor(meta.query_lens).cumsum(0).tolist()
        rows = [torch.arange(e - q, e) if all_positions and all_positions[i] else torch.tensor([e - 1])
                for i, (q, e) in enumerate(zip(meta.query_lens, ends))]
        logits = self.model.compute_logits(hidden[torch.cat(rows).to(self.device)])
        for s in seqs:
            s.num_cached = len(s)
        return list(logits.split([len(r) for r in rows]))


def _pad(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
