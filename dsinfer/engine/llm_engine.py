"""Runs requests step by step: new sequences are prefilled together, then all running ones decode."""
import itertools

import torch

from dsinfer.engine.kv_cache import KVCache
from dsinfer.engine.model_runner import ModelRunner
from dsinfer.engine.sampler import apply_penalties, block_stops, sample, token_logprobs
from dsinfer.engine.sequence import Sequence, SequenceStatus
from dsinfer.outputs import CompletionOutput, Logprob, RequestOutput
from dsinfer.sampling_params import SamplingParams
from dsinfer.tokenizer import IncrementalDetokenizer, Tokenizer


class LLMEngine:
    def __init__(self, model, tokenizer: Tokenizer | None, max_model_len: int, dtype, device, seed: int = 0,
                 max_num_seqs: int = 256):
        cfg = model.config
        self.model, self.tokenizer, self.max_model_len, self.max_num_seqs = model, tokenizer, max_model_len, max_num_seqs
        self.device = torch.device(device)
        self.cache = KVCache(cfg, dtype, device)
        self.runner = ModelRunner(model, self.cache)
        self.eos_ids = sorted(set(cfg.eos_token_id) | ({tokenizer.eos_token_id} - {None} if tokenizer else set()))
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.requests: dict[str, tuple[str | None, list[Sequence]]] = {}
        self.seq_counter = itertools.count()

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams):
        self.check_prompt(prompt_ids)
        max_tokens = self.max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        seqs = []
        for i in range(params.n):
            gen = None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed + i)
            seq = Sequence(next(self.seq_counter), request_id, i, prompt_ids, params, max_tokens, gen)
            if self.tokenizer:
                seq.detok = IncrementalDetokenizer(self.tokenizer, len(prompt_ids), params.skip_special_tokens)
            seqs.append(seq)
        self.requests[request_id] = (prompt, seqs)
        self.waiting += seqs

    def check_prompt(self, ids: list[int]):
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len} "
                             "and at least one token must be generated")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})")

    def abort(self, request_id: str):
        """Drops a request wherever it is and frees its cache blocks at once."""
        _, seqs = self.requests.pop(request_id, (None, []))
        for s in seqs:
            self.cache.free(s)
        self.waiting = [s for s in self.waiting if s.request_id != request_id]
        self.running = [s for s in self.running if s.request_id != request_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestOutput]:
        """One forward pass. Returns the current state of every request that it advanced."""
        if self.waiting:
            seqs, self.waiting = self.waiting[:self.max_num_seqs], self.waiting[self.max_num_seqs:]
            want = [s.params.prompt_logprobs is not None and s.index == 0 for s in seqs]
            logits = self.runner.run(seqs, True, want)
            for s, lg, w in zip(seqs, logits, want):
                if w:
                    s.prompt_logprobs = self.prompt_logprobs(s, lg)
                s.status = SequenceStatus.RUNNING
            self.running += seqs
            last = torch.stack([lg[-1] for lg in logits])
        else:
            seqs = self.running[:self.max_num_seqs]
            last = torch.cat(self.runner.run(seqs, False))
        self.postprocess(seqs, last)
        self.running = [s for s in self.running if not s.is_finished]
        return [self.request_output(rid) for rid in dict.fromkeys(s.request_id for s in seqs)]

    def postprocess(self, seqs: list[Sequence], logits: torch.Tensor):
        want_lp = any(s.params.logprobs is not None for s in seqs)
        raw = logits.log_softmax(-1) if want_lp else None
        logits = block_stops(apply_penalties(logits.clone(), seqs), seqs, self.eos_ids)
        tokens = sample(logits, seqs, self.generator).tolist()
        for i, (s, t) in enumerate(zip(seqs, tokens)):
            s.token_ids.append(t)
            if s.params.logprobs is not None:
                entry = self.make_logprobs(token_logprobs(raw[i], t, s.params.logprobs))
                s.logprobs.append(entry)
                s.cumulative_logprob += entry[t].logprob
            self.check_stop(s, t)
            if s.is_finished:
                self.cache.free(s)

    def check_stop(self, s: Sequence, token: int):
        p = s.params
        if token in p.stop_token_ids:  # sampling kept these out until min_tokens were produced
            return s.finish("stop", token)
        if not p.ignore_eos and token in self.eos_ids:
            return s.finish("stop")
        if s.detok:
            self.append_text(s, s.detok.step(s.token_ids))
        if not s.is_finished and (s.num_outputs >= s.max_tokens or len(s) >= self.max_model_len):
            s.finish("length")

    def append_text(self, s: Sequence, delta: str):
        before = len(s.text)
        s.text += delta
        if not delta or not s.params.stop_list or s.num_outputs < s.params.min_tokens:
            return
        longest = max(len(x) for x in s.params.stop_list)
        window = max(0, before - longest + 1)
        hits = [(s.text.find(x, window), x) for x in s.params.stop_list]
        hits = [(i, x) for i, x in hits if i >= 0]
        if hits:
            i, x = min(hits)
            s.text = s.text[:i]
            s.finish("stop", x)

    def make_logprobs(self, entry: dict[int, tuple[float, int]]) -> dict[int, Logprob]:
        text = (lambda t: self.tokenizer.decode([t], False)) if self.tokenizer else (lambda t: None)
        return {t: Logprob(lp, rank, text(t)) for t, (lp, rank) in entry.items()}

    def prompt_logprobs(self, s: Sequence, logits: torch.Tensor) -> list:
        """Position 0 has no logprob; position j > 0 gets the logprob of prompt token j given tokens < j."""
        lp = logits.log_softmax(-1)
        k = s.params.prompt_logprobs
        return [None] + [self.make_logprobs(token_logprobs(lp[j - 1], s.token_ids[j], k))
                         for j in range(1, s.num_prompt_tokens)]

    def request_output(self, request_id: str) -> RequestOutput:
        prompt, seqs = self.requests[request_id]
        outs = [CompletionOutput(s.index, s.text, s.output_ids, s.cumulative_logprob, s.logprobs,
                                 s.finish_reason, s.stop_reason) for s in seqs]
        done = all(s.is_finished for s in seqs)
        if done:
            del self.requests[request_id]
        return RequestOutput(request_id, prompt, seqs[0].token_ids[:seqs[0].num_prompt_tokens],
                             seqs[0].prompt_logprobs, outs, done)
