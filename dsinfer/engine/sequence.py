from enum import Enum, auto

import torch

from dsinfer.outputs import Logprob
from dsinfer.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()



class Sequence:
    """One sample of one request: its tokens, where they sit in the cache, and what it has produced."""
    __slots__ = ("seq_id", "request_id", "index", "params", "token_ids", "num_prompt_tokens", "num_cached",
                 "block_table", "block_hashes", "status", "generator", "detok", "text", "logprobs", "cumulative_logprob",
                 "prompt_logprobs", "finish_reason", "stop_reason", "max_tokens", "first",
                 "sent_text", "sent_tokens")

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, generator: torch.Generator | None):
        self.seq_id, self.request_id, self.index, self.params = seq_id, request_id, index, params
        self.token_ids, self.num_prompt_tokens = list(prompt_ids), len(prompt_ids)
        self.num_cached, self.block_table, self.block_hashes, self.status = 0, [], [], SequenceStatus.WAITING
        self.generator, self.detok, self.text, self.max_tokens = generator, None, "", max_tokens
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs = None
        self.finish_reason = self.stop_reason = None
        self.first: Sequence | None = None  # sample 0 of the same request, for samples 1..n-1
        self.sent_text = self.sent_tokens = 0  # how much of the output a delta stream has handed out

    def __len__(self) -> int:
        return len(self.token_ids)

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
