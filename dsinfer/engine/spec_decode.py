"""Speculative decoding with the checkpoint's MTP layer (models/mtp.py) as the draft model.

A step runs the main model over each entry's new tokens; a decode's new token is followed by the drafts the MTP
layer proposed last step, so one forward pass verifies them all (engine/rejection.py decides how many are
accepted, and adds one token of the target's own). The MTP layer then catches up over the positions the main
model computed and kept (from their final hidden states and the tokens after them) and drafts up to k tokens
for the next step: the first from its last position, the others by running it again on its own output.

The MTP layer's latent cache is the KV cache's last layer, in the sequence's own blocks: it is paged, shared by
prefix and freed with the sequence. Rows written for rejected tokens, in either cache, lie past num_cached and
are overwritten later: a rejection moves no data."""
import functools
import itertools
from dataclasses import dataclass, field

import torch

from dsinfer.engine import rejection
from dsinfer.engine.model_runner import is_decode
from dsinfer.engine.sampler import apply_penalties, apply_rules, apply_token_masks, block_stops
from dsinfer.engine.sequence import Sequence
from dsinfer.layers.attention import AttentionMetadata
from dsinfer.models.mtp import FusedDraft


@dataclass(slots=True)
class SpecStats:
    """Drafted and accepted tokens per draft position, and verify steps (entries that had drafts)."""
    drafted: list[int]
    accepted: list[int]
    verify_steps: int = 0

    @property
    def acceptance_rate(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step: the accepted drafts plus the target's own token."""
        return (sum(self.accepted) + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    def count(self, drafts: int, accepted: int):
        if drafts:
            self.verify_steps += 1
        for j in range(drafts):
            self.drafted[j] += 1
            self.accepted[j] += j < accepted


@dataclass(slots=True)
class Catchup:
    """Positions start .. start + len(hidden) - 1 of seq, for the MTP layer: the main model's hidden states there."""
    seq: Sequence
    start: int
    hidden: torch.Tensor
    prefill: bool
    drafts: int = 0  # how many to draft after it
    out: torch.Tensor | None = field(default=None)
    logits: torch.Tensor | None = field(default=None)  # the draft head's at out, where the C call gave them


class SpecDecoder:
    def __init__(self, engine, mtp, k: int, greedy_fast_path: bool = True, last_rows: bool = True,
                 share_steps: bool = True, chunk_drafts: bool = True, one_call: bool = True,
                 disable_by_batch_size: int | None = None):
        """last_rows: the MTP layer's catch-up computes its output (MoE / MLP, norm) only at each sequence's last
        position, the one it drafts from; the others only write their cache rows. share_steps: a catch-up over
        every position of a greedy step reuses the step's inputs to the fused layer (its StepC). chunk_drafts:
        catch-ups of more than kernels.MAX_M decode tokens take the fused layer in chunks (FusedDraft.in_chunks).
        one_call: a decode-sized draft step (the layer, its head and their argmax) is one C call
        (FusedDraft.one_call). disable_by_batch_size: while more sequences than this run, nothing is drafted and
        the MTP layer only writes its cache rows (its attention half), so that drafting resumes with a whole
        cache when the batch shrinks (vLLM's name)."""
        self.engine, self.mtp, self.k, self.greedy_fast_path = engine, mtp, k, greedy_fast_path
        self.last_rows, self.one_call, self.disable_by_batch_size = last_rows, one_call, disable_by_batch_size
        self.cache = engine.cache.layers[-1]
        main = engine.runner.fused if share_steps else None
        self.fused = FusedDraft.build(engine.model, mtp, self.cache, main, chunk_drafts)  # None: the Python layer
        self.stats = SpecStats([0] * k, [0] * k)

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]], want: list[bool]) -> list[Sequence]:
        """Computes the batch, verifies drafts, emits tokens and drafts again. Returns the sequences that
        produced tokens."""
        if self.greedy_fast_path and not any(want) and all(plain_greedy(s) for s, _ in batch):
            return self.greedy_step(batch)
        e = self.engine
        hidden = e.runner.run_hidden(batch).split([n for _, n in batch])
        ends = [s.num_cached + n - len(s.draft_ids) == len(s) for s, n in batch]
        logits = self.logits(batch, hidden, want, ends)
        ready, jobs = [], []
        for (s, n), h, lg, w, end in zip(batch, hidden, logits, want, ends):
            start, prefill = s.num_cached, not is_decode(s, n)
            e.num_prompt_computed += n - len(s.draft_ids) if start < s.num_prompt_tokens else 0
            if w:
                e.outputs.add_prompt_logprobs(s, lg, start)
            if end:
                ready.append((s, n, h, lg[-len(s.draft_ids) - 1:], prefill))
                continue
            s.num_cached += n
            e.blocks.commit(s)
            jobs.append(Catchup(s, start, h, prefill))
        jobs += self.verify(ready)
        self.draft(jobs)
        return [s for s, *_ in ready]

    def greedy_step(self, batch: list[tuple[Sequence, int]]) -> list[Sequence]:
        """step for a batch of plain greedy decodes (plain_greedy): every row is a verified position, so one
        argmax over the head's rows chooses for all, with no sampler pass; the same tokens as verify. The MTP
        layer's catch-up reuses the step's own positions, cache slots and block tables."""
        e = self.engine
        ids, positions, meta = e.runner.prepare(batch)
        hidden = e.runner.run_model(ids, positions, meta)
        best = e.model.compute_logits(hidden).argmax(-1).tolist()
        jobs, rows, next_ids, row = [], [], [], 0
        for s, n in batch:
            start, drafts, target = s.num_cached, s.draft_ids, best[row:row + n]
            e.num_prompt_computed += start < s.num_prompt_tokens
            accepted = next((j for j, (d, t) in enumerate(zip(drafts, target)) if d != t), len(drafts))
            tokens = drafts[:accepted] + [target[accepted]]
            self.stats.count(len(drafts), accepted)
            s.drop_drafts()
            if self.settle(s, start, 1, tokens, None):
                kept = s.num_cached - start
                jobs.append(Catchup(s, start, hidden[row:row + kept], False))
                rows += range(row, row + kept)
                next_ids += s.token_ids[start + 1:start + 1 + kept]
            row += n
        self.draft(jobs, self.catchup_inputs(rows, next_ids, hidden, positions, meta))
        return [s for s, _ in batch]

    def catchup_inputs(self, rows: list[int], next_ids: list[int], hidden, positions, meta: AttentionMetadata):
        """The MTP layer's (next ids, hidden, positions, metadata) for rows `rows` of a decode step, taken from
        the step's own tensors (the rows keep their slots; token_seq still points into the step's block tables),
        or None where the fused draft layer would not take them."""
        if not rows or self.fused is None or len(rows) > self.fused.decoder.step_tokens:
            return None
        ids = torch.tensor(next_ids, device=hidden.device)
        if len(rows) == hidden.shape[0]:  # every row: the step's own metadata (the fused layer's inputs are kept)
            return ids, hidden, positions, meta
        index = None if rows[-1] == len(rows) - 1 else torch.tensor(rows, device=hidden.device)  # None: a prefix
        take = functools.partial(pick_rows, count=len(rows), index=index)
        lens = [len(rows)]  # not read by the fused layer, which takes decodes per token
        sub = AttentionMetadata(0, 0, lens, lens, take(meta.slot_mapping), meta.gather_index, take(meta.token_seq))
        return ids, take(hidden), take(positions), sub

    def settle(self, s: Sequence, start: int, new: int, tokens: list[int], raw: torch.Tensor | None) -> bool:
        """Emits s's chosen tokens (until one finishes it, or ends its reasoning: the grammar then chooses the
        next) after its `new` computed tokens from `start`, and keeps the accepted ones' cache rows (all but the
        last emitted, which is the next step's input, unless s finished); returns whether s goes on."""
        e, emitted = self.engine, 0
        for t in tokens:
            grammar_starts = e.emit(s, t, None if raw is None else raw[emitted])
            emitted += 1
            if s.is_finished or grammar_starts:
                break
        s.num_cached = start + new + min(len(tokens) - 1, emitted if s.is_finished else emitted - 1)
        e.blocks.commit(s)
        if s.is_finished:
            e.scheduler.finish(s)
        return not s.is_finished

    def logits(self, batch, hidden, want, ends) -> list[torch.Tensor | None]:
        """Per entry: every position's logits where want asks, else those of its verified positions (the
        drafts' and the one before) where it reaches its end, else None."""
        rows = [h if w else h[-len(s.draft_ids) - 1:] if end else None
                for (s, _), h, w, end in zip(batch, hidden, want, ends)]
        wanted = [r for r in rows if r is not None]
        if not wanted:
            return rows
        out = iter(self.engine.model.compute_logits(torch.cat(wanted)).split([len(r) for r in wanted]))
        return [None if r is None else next(out) for r in rows]

    def verify(self, ready) -> list[Catchup]:
        """Accepts drafts and emits tokens for the entries that reached their end; returns the MTP catch-up of
        those that go on."""
        if not ready:
            return []
        jobs = []
        chosen = self.choose([(s, lg) for s, _, _, lg, _ in ready])
        for (s, n, h, lg, prefill), tokens in zip(ready, chosen):
            start, drafts = s.num_cached, len(s.draft_ids)
            self.stats.count(drafts, len(tokens) - 1)
            s.drop_drafts()
            raw = lg.log_softmax(-1) if s.params.logprobs is not None else None
            if self.settle(s, start, n - drafts, tokens, raw):
                jobs.append(Catchup(s, start, h[:s.num_cached - start], prefill))
        return jobs

    def choose(self, entries: list[tuple[Sequence, torch.Tensor]]) -> list[list[int]]:
        """The tokens each sequence emits: its accepted drafts and one of the target's."""
        e, out = self.engine, []
        counts = [len(lg) for _, lg in entries]
        target = rejection.processed(torch.cat([lg for _, lg in entries]), [s for s, _ in entries], counts, e.eos_ids)
        target = self.constrain(target, [s for s, _ in entries], counts)
        for (s, lg), t in zip(entries, target.split([len(lg) for _, lg in entries])):
            if s.params.greedy:
                out.append(rejection.accept_greedy(t, s.draft_ids))
            else:
                p = rejection.distribution(t, s.params)
                out.append(rejection.accept_sampled(p, s.draft_probs, s.draft_ids, s.generator or e.generator))
        return out

    def constrain(self, target: torch.Tensor, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
        """Structured outputs: a grammar row (it never drafts, so it has one position) keeps what its grammar
        allows, as in a plain step."""
        if all(s.matcher is None for s in seqs):
            return target
        rows = list(itertools.accumulate(counts, initial=0))[:-1]
        grammar = [(r, s) for r, s in zip(rows, seqs) if s.matcher is not None]
        masks = self.engine.grammars.fill_masks([s.matcher for _, s in grammar])
        row_seqs = [s for s, c in zip(seqs, counts) for _ in range(c)]
        return apply_token_masks(target, row_seqs, [r for r, _ in grammar], masks)

    def draft(self, jobs: list[Catchup], inputs: tuple | None = None):
        """The MTP layer over each job's positions, then up to k drafts per sequence. inputs: the layer's
        inputs for the jobs' positions, in their order, where the caller has them (catchup_inputs)."""
        if not jobs:
            return
        if inputs is None:
            jobs.sort(key=lambda j: not j.prefill)
        paused = self.paused()
        keep = torch.empty(0, dtype=torch.int64) if paused else self.kept_rows(jobs)
        if inputs is not None:
            outputs = self.forward(*inputs, keep)
        else:
            entries = [(j.seq.token_ids[j.start + 1:j.start + 1 + len(j.hidden)], j.start, j.seq.block_table)
                       for j in jobs]
            outputs = self.run(entries, torch.cat([j.hidden for j in jobs]), sum(j.prefill for j in jobs), keep)
        if paused:  # the cache rows are written; no drafts
            return
        counts = [1] * len(jobs) if keep is not None else [len(j.hidden) for j in jobs]
        take_last(jobs, counts, *outputs)
        last = [j for j in jobs if self.plan(j)]
        for step in range(self.k):
            last = [j for j in last if j.drafts > step]
            if not last:
                return
            if step:
                outputs = self.run([([j.seq.draft_ids[-1]], j.seq.num_cached + step - 1, j.seq.block_table)
                                    for j in last], torch.cat([j.out for j in last]), 0)
                take_last(last, [1] * len(last), *outputs)
            self.propose(last)

    def paused(self) -> bool:
        """Whether disable_by_batch_size stops drafting now: more sequences running than it allows."""
        limit = self.disable_by_batch_size
        return limit is not None and len(self.engine.scheduler.running) > limit

    def kept_rows(self, jobs: list[Catchup]) -> torch.Tensor | None:
        """With last_rows, the row of each job's last position (None where that is every row)."""
        if not self.last_rows or all(len(j.hidden) == 1 for j in jobs):
            return None
        return torch.tensor([end - 1 for end in itertools.accumulate(len(j.hidden) for j in jobs)])

    def run(self, entries, hidden: torch.Tensor, num_prefills: int, keep: torch.Tensor | None = None) -> tuple:
        ids, positions, meta = self.engine.runner.inputs(entries, num_prefills)
        return self.forward(ids, hidden, positions, meta, keep)

    def forward(self, ids, hidden, positions, meta: AttentionMetadata, keep: torch.Tensor | None = None) -> tuple:
        """The MTP layer's normed output at rows `keep` (every row where None), with the draft head's logits there
        where one C call gives both (one_call), else None for those."""
        if self.one_call and self.fused is not None and self.fused.takes_one_call(ids.shape[0], meta):
            return self.fused.one_call(ids, hidden, positions, meta, keep)
        return self.mtp(ids, hidden, positions, meta, self.cache, self.fused, keep), None

    def plan(self, job: Catchup) -> bool:
        """How many tokens job's sequence drafts (job.drafts): up to k, leaving room for the target's own token
        under max_tokens and max_model_len, and as many as free blocks allow for the MTP layer's chained rows."""
        s, e = job.seq, self.engine
        n = min(self.k, s.max_tokens - s.num_outputs - 1, e.max_model_len - len(s) - 1) \
            if s.num_new == 1 and s.matcher is None else 0  # grammar rows take one masked token a step
        while n > 1 and not e.blocks.can_reserve(s, s.num_cached + n - 1):
            n -= 1
        if n > 1:
            e.blocks.reserve(s, s.num_cached + n - 1)
        job.drafts = max(n, 0)
        return n > 0

    def propose(self, jobs: list[Catchup]):
        """One draft token per job from the MTP layer's output, greedy or drawn from its distribution."""
        e, seqs = self.engine, [j.seq for j in jobs]
        if all(j.logits is not None for j in jobs):  # from the C call
            logits = jobs[0].logits if len(jobs) == 1 else torch.cat([j.logits for j in jobs])
        else:
            out = jobs[0].out if len(jobs) == 1 else torch.cat([j.out for j in jobs])
            logits = self.mtp.compute_logits(out) if self.fused is None else self.fused.logits(out)
        if not all(rejection.unchanged(s) for s in seqs):  # each row at its own position only
            rows = [rejection.views(s, s.draft_ids, len(s.draft_ids) + 1)[-1] for s in seqs]
            logits = block_stops(apply_penalties(apply_rules(logits.clone(), rows), rows), rows, e.eos_ids)
        best = logits.argmax(-1).tolist()
        for i, (s, b) in enumerate(zip(seqs, best)):
            if s.params.greedy:
                s.draft_ids.append(b)
                continue
            q = rejection.distribution(logits[i:i + 1], s.params)
            s.draft_ids.append(rejection.draw(q[0], s.generator or e.generator))
            s.draft_probs = q if s.draft_probs is None else torch.cat([s.draft_probs, q])


def take_last(jobs: list[Catchup], counts: list[int], out: torch.Tensor, logits: torch.Tensor | None):
    """Gives each job the last of its `counts` rows of the draft layer's output (and logits, where given)."""
    for j, end in zip(jobs, itertools.accumulate(counts)):
        j.out = out[end - 1:end]
        j.logits = None if logits is None else logits[end - 1:end]


def pick_rows(t: torch.Tensor, count: int, index: torch.Tensor | None) -> torch.Tensor:
    """Rows of a step's tensor: its first `count` (the tensor itself where that is all of them: the rotation
    kept for these positions is found again), or those in `index`."""
    if index is not None:
        return t.index_select(0, index)
    return t if count == t.shape[0] else t[:count]


def plain_greedy(s: Sequence) -> bool:
    """Whether s is a decode (no drafts computed past its end) of a greedy request whose logits the sampler
    leaves alone: no logprobs, logit rules, penalties, pending min_tokens or grammar."""
    p = s.params
    return s.num_new == 1 and p.greedy and p.logprobs is None and s.matcher is None and rejection.unchanged(s)
