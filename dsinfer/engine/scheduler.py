"""Chooses each step's work under a token budget: running sequences first (a decode token, or their next
prefill chunk), then waiting ones as far as budget, sequence limit and free blocks allow. When a running
sequence needs a block and none is free, the newest running sequence is preempted: its blocks are freed and
it goes back to the front of the queue to be recomputed (mostly from the prefix cache) later."""
import time
from collections import deque
from itertools import islice

from dsinfer.engine.block_manager import BlockManager
from dsinfer.engine.config import EngineConfig
from dsinfer.engine.sequence import Sequence, SequenceStatus

Batch = list[tuple[Sequence, int]]  # (sequence, number of its tokens computed this step)


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        budget = self.cfg.max_num_batched_tokens
        batch, budget, preempted = self.schedule_running(budget)
        if not preempted:
            batch += self.schedule_waiting(budget)
        return batch

    def schedule_running(self, budget: int) -> tuple[Batch, int, bool]:
        batch, preempted, i = [], False, 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self.fit_drafts(seq, budget)
            while not self.blocks.can_reserve(seq, seq.num_cached + n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    return batch, budget, preempted
            self.blocks.reserve(seq, seq.num_cached + n)
            batch.append((seq, n))
            budget -= n
            i += 1
        return batch, budget, preempted

    def fit_drafts(self, seq: Sequence, budget: int) -> int:
        """Tokens of a running seq to compute now: its new ones and the drafts to verify (speculative decoding).
        Drafts give way to the budget and to free blocks before anyone is preempted for them."""
        new = seq.num_new
        n = min(new + len(seq.draft_ids), budget)
        if n > new and not self.blocks.can_reserve(seq, seq.num_cached + n):
            n = min(new, budget)
        seq.drop_drafts(max(n - new, 0))
        return n

    def schedule_waiting(self, budget: int) -> Batch:
        batch = []
        for seq in self.admission_order():
            if budget <= 0 or len(self.running) >= self.cfg.max_num_seqs:
                break
            if self.waits_for_sibling(seq):
                continue
            n = self.admit(seq, budget)
            if n is None:
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:  # not again after a preemption
                seq.metrics.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def admit(self, seq: Sequence, budget: int) -> int | None:
        """Gives a waiting seq its cached prefix and blocks for its first chunk; returns the chunk's size, or None
        if it does not fit now. A block that fails to load from the disk tier is computed instead, so the chunk
        may grow; if it then no longer fits an unchunked step, the seq gives its blocks back and waits."""
        hits = self.blocks.cached_prefix(seq)
        cached = len(hits) * self.blocks.block_size
        n = self.fit(len(seq) - cached, budget)
        if n is None or not self.blocks.can_allocate(seq, cached + n, hits):
            return None
        self.blocks.allocate(seq, hits)
        n = self.fit(len(seq) - seq.num_cached, budget)
        if n is None:
            self.blocks.free_seq(seq)
            return None
        self.blocks.reserve(seq, seq.num_cached + n)
        return n

    def fit(self, n: int, budget: int) -> int | None:
        """Tokens of an n-token prefill to compute now: all, or with chunked prefill as many as the budget allows."""
        if n > budget and not self.cfg.enable_chunked_prefill:
            return None
        return min(n, budget)

    def admission_order(self) -> list[Sequence]:
        """The head of the queue first (no request waits forever), then the next ones nearest its length."""
        if not self.cfg.length_bucketing or len(self.waiting) < 3:
            return list(self.waiting)
        head, window = self.waiting[0], self.cfg.bucket_window
        near = sorted(islice(self.waiting, 1, window), key=lambda s: abs(len(s) - len(head)))
        return [head, *near, *islice(self.waiting, window, None)]

    def waits_for_sibling(self, seq: Sequence) -> bool:
        """With prefix caching, samples 2..n of a request start once sample 1 has its prompt cached."""
        first = seq.first
        return (self.blocks.enable_prefix_caching and first is not None and not first.is_finished
                and first.num_cached < first.num_prompt_tokens)

    def preempt(self, seq: Sequence):
        self.running.remove(seq)
        seq.drop_drafts()
        self.blocks.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence):
        self.running.remove(seq)
        self.blocks.free_seq(seq)

    def remove(self, seq: Sequence):
        """Takes a sequence out wherever it is (abort), freeing its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
