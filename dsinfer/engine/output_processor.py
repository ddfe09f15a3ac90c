"""Builds RequestOutputs from sequences: cumulative, or only what is new since the last output (delta)."""
import torch

from dsinfer.engine.sampler import token_logprobs
from dsinfer.engine.sequence import Sequence
from dsinfer.outputs import CompletionOutput, Logprob, RequestOutput


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def make_logprobs(self, entry: dict[int, tuple[float, int]]) -> dict[int, Logprob]:
        text = (lambda t: self.tokenizer.decode([t], False)) if self.tokenizer else (lambda t: None)
        return {t: Logprob(lp, rank, text(t)) for t, (lp, rank) in entry.items()}

    def add_prompt_logprobs(self, s: Sequence, logits: torch.Tensor, start: int):
        """logits row i is position start + i; it gives the logprob of prompt token start + i + 1. Position 0
        has none. Entries already there (a chunk recomputed after preemption) are kept."""
        if s.prompt_logprobs is None:
            s.prompt_logprobs = [None]
        lp, k = logits.log_softmax(-1), s.params.prompt_logprobs
        for j in range(len(s.prompt_logprobs), min(start + len(logits) + 1, s.num_prompt_tokens)):
            s.prompt_logprobs.append(self.make_logprobs(token_logprobs(lp[j - 1 - start], s.token_ids[j], k)))

    def completion(self, s: Sequence) -> CompletionOutput:
        if s.params.output_kind != "delta":
            return CompletionOutput(s.index, s.text, s.output_ids, s.cumulative_logprob, s.logprobs,
                                    s.finish_reason, s.stop_reason)
        hold = 0 if s.is_finished else max((len(x) - 1 for x in s.params.stop_list), default=0)
        text_end = max(s.sent_text, len(s.text) - hold)  # held back: it may turn out to start a stop string
        text, ids = s.text[s.sent_text:text_end], s.output_ids[s.sent_tokens:]
        logprobs = None if s.logprobs is None else s.logprobs[s.sent_tokens:]
        s.sent_text, s.sent_tokens = text_end, s.num_outputs
        return CompletionOutput(s.index, text, ids, s.cumulative_logprob, logprobs, s.finish_reason, s.stop_reason)

    def request_output(self, request_id: str, prompt: str | None, seqs: list[Sequence]) -> RequestOutput:
        done = all(s.is_finished for s in seqs)
        first = seqs[0]
        return RequestOutput(request_id, prompt, first.token_ids[:first.num_prompt_tokens], first.prompt_logprobs,
                             [self.completion(s) for s in seqs], done, first.metrics)
