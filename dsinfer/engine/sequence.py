import hashlib
import struct
import time
from enum import Enum, auto

import torch

from dsinfer.outputs import Logprob, RequestMetrics
from dsinfer.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


def block_digest(previous: bytes, tokens) -> bytes:
    """A full block's stable name: blake2b over the previous block's name (b"" for the first) and this block's
    token ids as little-endian int64, so one name stands for the whole prefix, the same in every process."""
    return hashlib.blake2b(previous + struct.pack(f"<{len(tokens)}q", *tokens), digest_size=16).digest()


class Sequence:
    """One sample of one request: its tokens, where they sit in the cache, and what it has produced."""
    __slots__ = ("seq_id", "request_id", "index", "params", "token_ids", "num_prompt_tokens", "num_cached",
                 "block_table", "digests", "num_named", "status", "generator", "detok", "text", "logprobs",
                 "cumulative_logprob", "prompt_logprobs", "finish_reason", "stop_reason", "max_tokens", "first",
                 "sent_text", "sent_tokens", "rules", "metrics", "draft_ids", "draft_probs", "matcher",
                 "reasoning")

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, generator: torch.Generator | None):
        self.seq_id, self.request_id, self.index, self.params = seq_id, request_id, index, params
        self.metrics = RequestMetrics(time.monotonic())  # first_scheduled_time: set by the scheduler
        self.token_ids, self.num_prompt_tokens = list(prompt_ids), len(prompt_ids)
        self.num_cached, self.block_table, self.status = 0, [], SequenceStatus.WAITING
        self.digests: list[bytes] = []  # chained names of the full blocks of token_ids, computed as needed
        self.num_named = 0  # leading blocks of block_table that the block manager has named
        self.generator, self.detok, self.text, self.max_tokens = generator, None, "", max_tokens
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs = None
        self.finish_reason = self.stop_reason = None
        self.first: Sequence | None = None  # sample 0 of the same request, for samples 1..n-1
        self.sent_text = self.sent_tokens = 0  # how much of the output a delta stream has handed out
        self.rules = None  # the request's LogitRules (sampler.build_rules), shared by its samples
        self.draft_ids: list[int] = []  # tokens the MTP layer proposed after token_ids, verified next step
        self.draft_probs = None  # [drafts, vocab] the distributions they were drawn from (sampled requests)
        self.matcher = None  # structured outputs: the grammar state after this sample's output tokens
        self.reasoning = None  # structured outputs after reasoning: the grammar waiting for </think> (reasoning_end)

    def __len__(self) -> int:
        return len(self.token_ids)

    def block_digests(self, block_size: int, count: int) -> list[bytes]:
        """The chained names of the first `count` full blocks (at least), each computed once: tokens only grow."""
        digests = self.digests
        while len(digests) < count:
            i = len(digests)
            tokens = self.token_ids[i * block_size:(i + 1) * block_size]
            digests.append(block_digest(digests[-1] if digests else b"", tokens))
        return digests

    @property
    def num_new(self) -> int:
        """Tokens of token_ids not yet in the cache: the prompt's rest, or 1 for a decode."""
        return len(self.token_ids) - self.num_cached

    def drop_drafts(self, keep: int = 0):
        del self.draft_ids[keep:]
        if not self.draft_ids:
            self.draft_probs = None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason=None):
        self.status, self.finish_reason, self.stop_reason = SequenceStatus.FINISHED, reason, stop_reason
