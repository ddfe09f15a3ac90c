"""Token selection: logit bias, allowed tokens, bad words, penalties, temperature, top-k / top-p / min-p, seeded
sampling, and logprobs."""
from dataclasses import dataclass

import numpy as np
import torch

from dsinfer import kernels
from dsinfer.engine.sequence import Sequence


@dataclass(slots=True)
class LogitRules:
    """A request's fixed changes to the logits, built once at admission: bias ([V]: logit_bias, and -inf outside
    allowed_token_ids; None without either) and the bad words' token sequences."""
    bias: torch.Tensor | None
    bad_words: list[list[int]]


def build_rules(params, vocab: int, device, tokenizer) -> LogitRules | None:
    """The request's LogitRules, or None when it has none of logit_bias, allowed_token_ids and bad_words."""
    bias = None
    if params.allowed_token_ids:
        bias = torch.full((vocab,), float("-inf"), device=device)
        bias[torch.tensor(params.allowed_token_ids, device=device)] = 0.0
    if params.logit_bias:
        bias = torch.zeros(vocab, device=device) if bias is None else bias
        ids = torch.tensor(list(params.logit_bias), device=device)
        bias[ids] += torch.tensor(list(params.logit_bias.values()), dtype=bias.dtype, device=device)
    words = bad_word_ids(params.bad_words, tokenizer) if params.bad_words else []
    return LogitRules(bias, words) if bias is not None or words else None


def bad_word_ids(words: list[str], tokenizer) -> list[list[int]]:
    """Each word's token ids as it would start the text and as it would follow a space (vLLM's two forms), kept
    once each."""
    forms = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in forms:
                forms.append(ids)
    return forms


def banned_bad_words(s: Sequence) -> list[int]:
    """The last token of every bad word whose other tokens end the output so far (one-token words: always)."""
    out = s.output_ids
    return [w[-1] for w in s.rules.bad_words
            if len(w) - 1 <= len(out) and (len(w) == 1 or out[len(out) - len(w) + 1:] == w[:-1])]


def apply_rules(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Adds each row's bias (logit_bias, allowed_token_ids) in one batched add and masks its bad words."""
    rows = [i for i, s in enumerate(seqs) if s.rules is not None and s.rules.bias is not None]
    if rows:
        logits[rows] += torch.stack([seqs[i].rules.bias for i in rows])
    bans = [(i, t) for i, s in enumerate(seqs) if s.rules is not None for t in banned_bad_words(s)]
    if bans:
        rows_t, tokens = torch.tensor(bans, device=logits.device).T
        logits[rows_t, tokens] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """vLLM's rules: repetition over prompt and output tokens, presence and frequency over output tokens."""
    for i, s in enumerate(seqs):
        p = s.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(s.token_ids, device=logits.device).unique()
            row = logits[i, seen]
            logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and s.num_outputs:
            counts = torch.bincount(torch.tensor(s.output_ids, device=logits.device), minlength=logits.shape[1])
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def block_stops(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> torch.Tensor:
    """Until min_tokens are out, the end-of-sequence and stop tokens cannot be chosen."""
    for i, s in enumerate(seqs):
        if s.num_outputs < s.params.min_tokens:
            banned = s.params.stop_token_ids + ([] if s.params.ignore_eos else eos_ids)
            logits[i, banned] = float("-inf")
    return logits


def filter_logits(x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """x: temperature-scaled logits of sampled rows. Masks what top-k, top-p and min-p exclude."""
    top_k = [s.params.top_k if s.params.top_k > 0 else x.shape[1] for s in seqs]
    top_p = torch.tensor([s.params.top_p for s in seqs], device=x.device)
    min_p = torch.tensor([s.params.min_p for s in seqs], device=x.device)
    if min(top_k) >= x.shape[1] and bool((top_p >= 1).all()) and not bool(min_p.any()):
        return x
    sorted_x, order = x.sort(-1, descending=True)
    ranks = torch.arange(x.shape[1], device=x.device)[None, :]
    drop = ranks >= torch.tensor(top_k, device=x.device)[:, None]
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    return x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [B, ceil(V / 32)] bitmask on the CPU (bit t % 32 of word t // 32 for token t) -> bool [B, V]."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(bits[:, :vocab].view(np.bool_))


def mask_rows(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """Row rows[j] of logits keeps only the tokens bitmask[j] allows (the rest -inf), in place: the torch path
    of kernels.token_mask."""
    allowed = unpack_bitmask(bitmask, logits.shape[1]).to(logits.device)
    if rows == list(range(logits.shape[0])):
        return logits.masked_fill_(~allowed, float("-inf"))
    logits[rows] = logits[rows].masked_fill_(~allowed, float("-inf"))
    return logits


def apply_token_masks(logits: torch.Tensor, seqs: list[Sequence], rows: list[int], bitmask: torch.Tensor,
                      kernel: bool = False) -> torch.Tensor:
    """Structured outputs: row rows[j] keeps only the tokens bitmask[j] allows, in place (kernel: in C, where
    kernels.token_mask_usable). The grammar wins over every other rule: a row whose other rules
    (allowed_token_ids, bad words, min_tokens holding back the end the grammar asks for) left none of the
    grammar's tokens picks uniformly among them instead."""
    if not rows:
        return logits
    fill = kernels.token_mask if kernel and kernels.token_mask_usable(logits) else mask_rows
    fill(logits, rows, bitmask)
    for j, i in enumerate(rows):
        if could_exclude_all(seqs[i]) and not bool(logits[i].isfinite().any()):
            logits[i] = 0.0
            fill(logits, [i], bitmask[j:j + 1])
    return logits


def could_exclude_all(s: Sequence) -> bool:
    """Whether a sequence's own rules can leave a grammar no token: allowed tokens, bad words, min_tokens."""
    return s.rules is not None or s.num_outputs < s.params.min_tokens


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None) -> torch.Tensor:
    """logits: [B, V] fp32 after penalties -> the chosen token of each row [B]."""
    return sample_scores(logits, seqs, generator).argmax(-1)


def sample_scores(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] scores whose row argmax is the row's sample: greedy rows' logits; for the others p / Exp(1) noise
    (Gumbel-max), each seeded request's noise from its own generator so it is reproducible. A row's argmax over a
    subset of tokens is the sample of its logits masked to that subset (the grammar's check-first path)."""
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not rows:
        return logits
    picked = [seqs[i] for i in rows]
    temp = torch.tensor([s.params.temperature for s in picked], device=logits.device)[:, None]
    probs = filter_logits(logits[rows] / temp, picked).softmax(-1)
    noise = torch.empty_like(probs)
    for j, s in enumerate(picked):
        noise[j].exponential_(generator=s.generator or generator)
    if len(rows) == len(seqs):
        return probs.div_(noise)
    scores = logits.clone()
    scores[rows] = probs / noise
    return scores


def token_logprobs(logprobs: torch.Tensor, token: int, k: int) -> dict[int, tuple[float, int]]:
    """The chosen token's logprob and rank, plus the k most likely tokens: {token: (logprob, rank)}."""
    chosen = logprobs[token]
    out = {token: (chosen.item(), int((logprobs > chosen).sum().item()) + 1)}
    if k:
        values, ids = logprobs.topk(k)
        for rank, (t, v) in enumerate(zip(ids.tolist(), values.tolist()), 1):
            out.setdefault(t, (v, rank))
    return out
