"""Verifying drafted tokens so that the output has exactly the target model's distribution (speculative sampling,
Leviathan et al. 2023, Chen et al. 2023).

Draft token d_j was drawn from the draft distribution q_j; the target gives p_j at the same position. d_j is
accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection a token is drawn from
max(0, p_j - q_j) renormalized and the rest are dropped; if every draft is accepted, one more token is drawn
from the target's next distribution. Each emitted token is then distributed exactly as p, whatever q is.
Greedy requests accept the longest prefix of drafts equal to the target's argmax, then take the argmax.

p and q are what the sampler would draw from: logits after logit bias, allowed tokens, bad words, penalties and
min_tokens (sampler.py, over the tokens up to that position, drafts included), then temperature and
top-k / top-p / min-p."""
from dataclasses import dataclass

import torch

from dsinfer.engine.sampler import LogitRules, apply_penalties, apply_rules, block_stops, filter_logits
from dsinfer.engine.sequence import Sequence
from dsinfer.sampling_params import SamplingParams


@dataclass(slots=True)
class SeqView:
    """A sequence as the sampler sees it at one position: its tokens up to there, drafts included."""
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    rules: LogitRules | None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def views(seq: Sequence, drafts: list[int], count: int) -> list[SeqView]:
    """seq at the positions after token_ids + drafts[:j], j = 0 .. count - 1."""
    return [SeqView(seq.token_ids + drafts[:j], seq.num_prompt_tokens, seq.params, seq.rules) for j in range(count)]


def unchanged(seq: Sequence) -> bool:
    """Whether the sampler leaves seq's logits as they are before temperature at every position from here on: no
    logit rules, no penalties, min_tokens reached."""
    p = seq.params
    return (seq.rules is None and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and seq.num_outputs >= p.min_tokens)


def processed(logits: torch.Tensor, seqs: list[Sequence], counts: list[int], eos_ids: list[int]) -> torch.Tensor:
    """logits [R, V] fp32 of seqs' next `counts` positions each (after token_ids + draft_ids[:j]), as the sampler
    changes them before temperature; the logits themselves where it would not change them."""
    if all(unchanged(s) for s in seqs):
        return logits
    rows = [v for s, n in zip(seqs, counts) for v in views(s, s.draft_ids, n)]
    return block_stops(apply_penalties(apply_rules(logits.clone(), rows), rows), rows, eos_ids)


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampler's distribution [R, V] for processed logits of one sampled (not greedy) request."""
    temp = torch.full((logits.shape[0], 1), params.temperature, device=logits.device)
    rows = [SeqView([], 0, params, None)] * logits.shape[0]
    return filter_logits(logits / temp, rows).softmax(-1)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token drawn in proportion to weights [V] (not necessarily normalized)."""
    return int(torch.multinomial(weights, 1, generator=generator).item())


def accept_greedy(target: torch.Tensor, drafts: list[int]) -> list[int]:
    """target: processed logits [len(drafts) + 1, V]. The drafts equal to the argmax, then the argmax."""
    best = target.argmax(-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return drafts[:n] + [best[n]]


def accept_sampled(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int],
                   generator: torch.Generator | None) -> list[int]:
    """p: target distributions [len(drafts) + 1, V]; q: draft distributions [len(drafts), V]. The accepted
    drafts, then one token from the residual at the first rejection, or from p's last row."""
    for j, t in enumerate(drafts):
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[j, t] < p[j, t]:  # u < p / q, with q(t) > 0 since t was drawn from q
            continue
        residual = (p[j] - q[j]).clamp_(min=0)
        return drafts[:j] + [draw(residual if residual.sum() > 0 else p[j], generator)]
    return drafts + [draw(p[len(drafts)], generator)]
