"""Turns a scheduled batch into the model's flat inputs, runs it, and returns the logits each sequence needs."""

import torch

from dsinfer.engine.kv_cache import KVCache
from dsinfer.engine.sequence import Sequence
from dsinfer.layers import kv_format
from dsinfer.layers.attention import AttentionMetadata
from dsinfer.layers.block_sparse import BlockSparseMLA
from dsinfer.models.fused_decode import FusedDecoder, decode_slice


class ModelRunner:
    def __init__(self, model, cache: KVCache, chunk_decodes: bool = False):
        """chunk_decodes: decode steps of more than the fused decoder's step_tokens run through it too, in
        chunks of at most its step_tokens (speculative decoding's verify steps: each token then gets the numbers
        it gets as a plain decode)."""
        self.model, self.cache, self.device = model, cache, cache.device
        self.offsets = torch.arange(cache.block_size, device=self.device)
        # None: every step runs the Python layers (always for sparse attention, which the C layer does not do)
        self.fused = None if cache.index_layers or cache.summaries else FusedDecoder.build(model, cache.layers)
        self.chunk_decodes = chunk_decodes

    def prepare(self, batch: list[tuple[Sequence, int]]):
        """batch: (seq, new tokens) with prefill chunks (more than one new token) before decodes (is_decode).
        New tokens of seq are positions num_cached .. num_cached + n - 1; its blocks are already reserved. A
        decode's drafts (speculative decoding) follow its token and it stays a decode: each of its tokens attends
        causally through the absorbed path, as it would have alone."""
        entries = [(new_ids(s, n), s.num_cached, s.block_table) for s, n in batch]
        return self.inputs(entries, sum(1 for s, n in batch if not is_decode(s, n)))

    def inputs(self, entries: list[tuple[list[int], int, list[int]]], num_prefills: int | None = None):
        """(input ids, positions, AttentionMetadata) of a step from (new token ids, first new position, block
        table) per sequence; the first num_prefills entries are prefill chunks (None: those of more than one
        token). Per-token lists are built in Python and become tensors in one call: a decode step is a few
        tokens."""
        bs = self.cache.block_size
        ids, positions, slots, token_seq, lens, ends = [], [], [], [], [], []
        for i, (tokens, start, table) in enumerate(entries):
            n = len(tokens)
            span = range(start, start + n)
            ids += tokens
            positions += span
            slots += [table[p // bs] * bs + p % bs for p in span]
            token_seq += [i] * n
            lens.append(n)
            ends.append(start + n)
        flat = torch.tensor([ids, positions, slots, token_seq]).to(self.device, non_blocking=True)
        tables = _pad([table for _, _, table in entries]).to(self.device, non_blocking=True)
        gather = (tables[:, :, None] * bs + self.offsets).flatten(1)  # [B, blocks * bs], padding -> block 0
        prefills = sum(1 for n in lens if n > 1) if num_prefills is None else num_prefills
        meta = AttentionMetadata(prefills, sum(lens[:prefills]), lens, ends, flat[2], gather, flat[3])
        return flat[0], flat[1], meta

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], all_positions: list[bool]) -> list[torch.Tensor | None]:
        """Logits per batch entry: [n, vocab] for every new position where all_positions asks, [1, vocab] for
        the last one when the entry reaches the end of its sequence (it will sample), else None."""
        rows, end = [], 0
        for (seq, n), every in zip(batch, all_positions):
            end += n
            last = seq.num_cached + n == len(seq)
            rows.append(torch.arange(end - n, end) if every else torch.arange(end - 1, end) if last else None)
        wanted = [r for r in rows if r is not None]
        if not wanted:
            self.run_hidden(batch)
            return [None] * len(batch)
        logits = iter(self.logits(batch, torch.cat(wanted).to(self.device)).split([len(r) for r in wanted]))
        return [None if r is None else next(logits) for r in rows]

    def logits(self, batch: list[tuple[Sequence, int]], rows: torch.Tensor) -> torch.Tensor:
        """The logits at `rows` of the batch's final hidden states. A tensor-parallel leader whose ranks take a
        step and its rows in one message (engine/worker.Leader) gets both at once."""
        if self.fused is None and getattr(self.model, "steps_with_logits", False):
            return self.model.forward_logits(*self.prepare(batch), self.cache.model_caches(), rows)
        return self.model.compute_logits(self.run_hidden(batch)[rows])

    @torch.inference_mode()
    def run_hidden(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Final hidden states [tokens, hidden] of every new token of the batch, entry after entry."""
        return self.run_model(*self.prepare(batch))

    def run_model(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states of a step: decode steps through the fused decoder where the model has one, the
        rest through the model's layers."""
        if self.fused is not None and self.fused.takes(input_ids.shape[0], meta):
            return self.fused(input_ids, positions, meta)
        if self.fused is not None and self.chunk_decodes and meta.num_prefills == 0:
            n = self.fused.step_tokens
            return torch.cat([self.fused(input_ids[a:a + n], positions[a:a + n], decode_slice(meta, a, n))
                              for a in range(0, input_ids.shape[0], n)])
        return self.model(input_ids, positions, meta, self.cache.model_caches())


def new_ids(seq: Sequence, n: int) -> list[int]:
    """The n tokens of seq computed this step: from its first uncached one, then its drafts."""
    start, drafts = seq.num_cached, seq.draft_ids
    return seq.token_ids[start:start + n - len(drafts)] + drafts if drafts else seq.token_ids[start:start + n]


def is_decode(seq: Sequence, n: int) -> bool:
    """Whether a batch entry runs as a decode: one token, or the one new token of seq and its drafts."""
    return n == 1 or seq.num_new == 1


def _pad(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)


def scratch_forward(model, ids: list[int], block_size: int = 16, kv_dtype: str = "auto") -> torch.Tensor:
    """Final hidden states [n, hidden] of one sequence through a scratch cache of its own (in kv_dtype), so that
    no engine blocks are touched (embeddings, calibration, scoring)."""
    weight = model.model.norm.weight
    kv_dtype = kv_format.resolve(kv_dtype, weight.dtype)
    summaries = any(isinstance(layer.self_attn, BlockSparseMLA) for layer in model.model.layers)
    cache = KVCache(model.config, kv_dtype, weight.device, -(-len(ids) // block_size), block_size,
                    block_summaries=summaries)
    runner = ModelRunner(model, cache)
    return runner.run_model(*runner.inputs([(list(ids), 0, list(range(cache.num_blocks)))]))


@torch.inference_mode()
def embed(model, ids: list[int]) -> torch.Tensor:
    """A prompt's embedding: the model's final hidden states, mean-pooled and L2-normalised [hidden]."""
    return torch.nn.functional.normalize(scratch_forward(model, ids).float().mean(0), dim=0)


@torch.inference_mode()
def score(model, ids: list[int], kv_dtype: str = "auto") -> torch.Tensor:
    """Next-token logits [n, vocab] at every position of one sequence, its cache in kv_dtype."""
    return model.compute_logits(scratch_forward(model, ids, kv_dtype=kv_dtype))
