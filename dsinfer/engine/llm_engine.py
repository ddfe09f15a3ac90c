"""Runs requests step by step: the scheduler picks prefill chunks and decodes under a token budget, the
runner computes them in one forward pass, and sequences that reached their end sample a token."""
import itertools
import logging
from pathlib import Path

import torch

from dsinfer.engine import worker
from dsinfer.engine.block_manager import BlockManager
from dsinfer.engine.config import EngineConfig
from dsinfer.engine.disk_cache import DiskTier, cache_layout, model_key
from dsinfer.engine.grammar import Grammars, sample_in_grammar
from dsinfer.engine.input_processor import InputProcessor, truncate_prompt
from dsinfer.engine.kv_cache import KVCache, plan_blocks
from dsinfer.engine.loading import load_engine_model
from dsinfer.engine.model_runner import ModelRunner, is_decode
from dsinfer.engine.output_processor import OutputProcessor
from dsinfer.engine.reasoning_end import Reasoning, ReasoningEnd
from dsinfer.engine.sampler import apply_penalties, apply_rules, block_stops, build_rules, sample, token_logprobs
from dsinfer.engine.scheduler import Scheduler
from dsinfer.engine.sequence import Sequence
from dsinfer.engine.spec_decode import SpecDecoder
from dsinfer.engine.stats import EngineStats, collect_stats
from dsinfer.layers import kv_format
from dsinfer.layers.parallel import Shard
from dsinfer.models.loader import default_model_path, read_config
from dsinfer.outputs import RequestOutput
from dsinfer.sampling_params import SamplingParams
from dsinfer.tokenizer import IncrementalDetokenizer, Tokenizer


log = logging.getLogger("dsinfer")


class LLMEngine:
    def __init__(self, model, tokenizer: Tokenizer | None, cfg: EngineConfig, dtype, device, seed: int = 0,
                 checkpoint: Path | None = None, mtp=None):
        """model: loaded; cfg: fitted to the model (EngineConfig.fit_to); checkpoint: the model's directory (names
        the disk tier's blocks, needed with cfg.prefix_cache_dir); mtp: the MTP draft layer (models/mtp.py) when
        cfg.speculative_config asks for speculative decoding."""
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, torch.device(device)
        self.dtype, self.quantization, self.mtp_tensors = dtype, None, {}
        self.max_model_len = cfg.max_model_len
        self.cache = self.make_cache(model.config, dtype, 0 if mtp is None else 1)
        self.disk_tier = self.make_disk_tier(checkpoint)
        self.blocks = BlockManager(self.cache.num_blocks, cfg.block_size, cfg.enable_prefix_caching, self.disk_tier,
                                   self.cache)
        self.scheduler = Scheduler(cfg, self.blocks)
        self.runner = ModelRunner(model, self.cache, chunk_decodes=mtp is not None)
        self.inputs, self.outputs = InputProcessor(tokenizer), OutputProcessor(tokenizer)
        mcfg = model.config
        self.eos_ids = sorted(set(mcfg.eos_token_id) | ({tokenizer.eos_token_id} - {None} if tokenizer else set()))
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.grammars = Grammars(tokenizer, mcfg.vocab_size, self.eos_ids, model.kernel_config.cpu_kernels,
                                 cfg.grammar_share_lexer, cfg.grammar_lean_refusal)
        self.reasoning_end = ReasoningEnd(tokenizer) if cfg.reasoning_parser and tokenizer else None
        self.requests: dict[str, tuple[str | None, list[Sequence]]] = {}
        self.seq_counter = itertools.count()
        self.num_generated = self.num_prompt_computed = 0
        self.spec = None if mtp is None else SpecDecoder(self, mtp, cfg.num_speculative_tokens,
                                                              cfg.spec_greedy_fast_path, cfg.spec_draft_last_rows,
                                                              cfg.spec_share_steps, cfg.spec_chunk_drafts,
                                                              cfg.spec_draft_one_call,
                                                              cfg.speculative_config.get("disable_by_batch_size"))
        self.team = None  # the tensor-parallel group, on rank 0 of one

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "LLMEngine":
        """Reads the checkpoint cfg.model names, builds and loads its model with the kernels cfg chooses, and
        the tokenizer, cache and scheduler around it."""
        if cfg.tensor_parallel_size > 1:
            return cls.parallel(cfg)
        m = load_engine_model(cfg)
        engine = cls(m.model, load_tokenizer(Path(cfg.tokenizer or m.path)), cfg, m.dtype, m.device, cfg.seed, m.path,
                     m.draft)
        engine.quantization, engine.mtp_tensors = m.bits, m.mtp  # bits per quantized unit; the MTP layer's tensors
        return engine

    @classmethod
    def parallel(cls, cfg: EngineConfig) -> "LLMEngine":
        """The engine on rank 0 of a tensor-parallel group (engine/worker.py); the other ranks follow its model."""
        path = Path(cfg.model) if cfg.model is not None else default_model_path()
        Shard(size=cfg.tensor_parallel_size, expert_parallel=cfg.enable_expert_parallel).local_config(read_config(path))
        cfg.dtype = cfg.torch_dtype(cfg.torch_device())  # decided here, so that every rank computes in it
        team = worker.start(cfg)
        try:
            m = load_engine_model(cfg, team.shard)
            team.wait_for("ready")
            model = worker.Leader(m.model, team)
            engine = cls(model, load_tokenizer(Path(cfg.tokenizer or m.path)), cfg, m.dtype, m.device, cfg.seed, m.path)
            model.share_cache(engine.cache)
        except BaseException:
            team.close()
            raise
        engine.quantization, engine.mtp_tensors, engine.team = m.bits, m.mtp, team
        return engine

    def make_cache(self, mcfg, dtype, extra_layers: int) -> KVCache:
        """Fixed-size cache from the memory budget; it must hold at least one sequence of max_model_len.
        extra_layers: the MTP draft layer's cache, in the same blocks."""
        cfg = self.cfg
        kv_dtype = kv_format.resolve(cfg.kv_cache_dtype, dtype)
        blocks = plan_blocks(mcfg, kv_dtype, self.device, cfg.block_size, cfg.kv_cache_memory,
                             cfg.kv_cache_memory_fraction, cfg.max_num_seqs * cfg.max_model_len, extra_layers)
        if blocks * cfg.block_size < cfg.max_model_len:
            raise ValueError(f"the KV cache budget holds {blocks * cfg.block_size} tokens, fewer than max_model_len "
                             f"({cfg.max_model_len}); raise kv_cache_memory or lower max_model_len")
        return KVCache(mcfg, kv_dtype, self.device, blocks, cfg.block_size, extra_layers,
                       cfg.sparse_attention is not None)

    def make_disk_tier(self, checkpoint: Path | None) -> DiskTier | None:
        """The prefix cache's disk tier, in a subdirectory of prefix_cache_dir named for this model and setting."""
        cfg = self.cfg
        if cfg.prefix_cache_dir is None:
            return None
        if not cfg.enable_prefix_caching:
            raise ValueError("prefix_cache_dir keeps blocks evicted from the prefix cache: it needs "
                             "enable_prefix_caching=True")
        if checkpoint is None:
            raise ValueError("prefix_cache_dir needs the checkpoint directory to name the model's blocks; build the "
                             "engine with LLMEngine.from_config")
        settings = dict(dtype=str(self.dtype), kv_cache_dtype=self.cache.kv_dtype, block_size=cfg.block_size,
                        num_layers=len(self.cache.layers), quantization=cfg.quantization,
                        quant_group_size=cfg.quant_group_size, sparse_attention=cfg.sparse_config())
        directory = Path(cfg.prefix_cache_dir) / model_key(Path(checkpoint), settings)
        return DiskTier(directory, cfg.prefix_cache_dir_bytes, cache_layout(self.cache))

    def close(self):
        """Writes the prefix-cache blocks still in memory and those queued to the disk tier, and stops its writer
        thread. Without close, the thread (a daemon) ends with the process: queued blocks are lost, but no file
        is ever left half written."""
        if self.disk_tier is not None:
            self.blocks.spill_cached()
            self.disk_tier.close()
        if self.team is not None:
            self.team.close()

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams):
        prompt_ids = truncate_prompt(prompt_ids, params)
        self.check_prompt(prompt_ids)
        self.check_params(params)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        max_tokens = self.max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        seqs, rules = [], build_rules(params, self.model.config.vocab_size, self.device, self.tokenizer)
        grammar = self.grammars.check(params.structured_outputs)
        reasons = bool(grammar) and self.reasons_first(prompt_ids)
        for i in range(params.n):
            gen = None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed + i)
            seq = Sequence(next(self.seq_counter), request_id, i, prompt_ids, params, max_tokens, gen)
            if self.tokenizer:
                seq.detok = IncrementalDetokenizer(self.tokenizer, len(prompt_ids), params.skip_special_tokens)
            seq.first, seq.rules = (seqs[0] if seqs else None), rules
            matcher = grammar and self.grammars.matcher(grammar)
            seq.matcher, seq.reasoning = (None, Reasoning(matcher)) if reasons else (matcher, None)
            seqs.append(seq)
        self.requests[request_id] = (prompt, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def reasons_first(self, prompt_ids: list[int]) -> bool:
        """Whether a constrained output starts with free reasoning (a reasoning parser is set and the prompt has
        not closed the reasoning already)."""
        return self.reasoning_end is not None and not self.reasoning_end.ended_in_prompt(prompt_ids)

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

    def check_params(self, params: SamplingParams):
        """The sampling parameters that index the vocabulary must fit this model's; ValueError names the field."""
        vocab = self.model.config.vocab_size
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > vocab:
                raise ValueError(f"SamplingParams.{name} must be <= the vocabulary size {vocab}, "
                                 f"got {getattr(params, name)}")
        for name in ("logit_bias", "allowed_token_ids"):
            bad = [t for t in getattr(params, name) or [] if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"SamplingParams.{name} token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})")
        if params.bad_words and self.tokenizer is None:
            raise ValueError("SamplingParams.bad_words needs a tokenizer, and this model directory has none")
        self.grammars.check(params.structured_outputs)

    def abort(self, request_id: str):
        """Drops a request wherever it is and frees its cache blocks at once."""
        _, seqs = self.requests.pop(request_id, (None, []))
        for s in seqs:
            self.scheduler.remove(s)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return collect_stats(self)

    def step(self) -> list[RequestOutput]:
        """One forward pass. Returns the state of every request that produced a token in it."""
        batch = sorted(self.scheduler.schedule(), key=lambda entry: is_decode(*entry))  # prefill chunks first
        if not batch:
            return []
        want = [s.index == 0 and s.params.prompt_logprobs is not None and s.num_cached < s.num_prompt_tokens
                for s, _ in batch]
        ready = self.spec.step(batch, want) if self.spec is not None else self.plain_step(batch, want)
        return [out for rid in dict.fromkeys(s.request_id for s in ready) if (out := self.request_output(rid))]

    def plain_step(self, batch: list[tuple[Sequence, int]], want: list[bool]) -> list[Sequence]:
        """Computes the batch and samples one token for each sequence that reached its end; returns those."""
        logits = self.runner.run(batch, want)
        ready, rows = [], []
        for (s, n), lg, w in zip(batch, logits, want):
            start, s.num_cached = s.num_cached, s.num_cached + n
            self.num_prompt_computed += n if start < s.num_prompt_tokens else 0
            self.blocks.commit(s)
            if w:
                self.outputs.add_prompt_logprobs(s, lg, start)
            if s.num_cached == len(s):
                ready.append(s)
                rows.append(lg[-1])
        if ready:
            self.postprocess(ready, torch.stack(rows))
        return ready

    def postprocess(self, seqs: list[Sequence], logits: torch.Tensor):
        want_lp = any(s.params.logprobs is not None for s in seqs)
        raw = logits.log_softmax(-1) if want_lp else None
        logits = block_stops(apply_penalties(apply_rules(logits.clone(), seqs), seqs), seqs, self.eos_ids)
        tokens, advanced = self.choose_tokens(logits, seqs)
        for i, (s, t) in enumerate(zip(seqs, tokens)):
            self.emit(s, t, None if raw is None else raw[i], i in advanced)
            if s.is_finished:
                self.scheduler.finish(s)

    def emit(self, s: Sequence, token: int, raw: torch.Tensor | None, advanced: bool = False) -> bool:
        """Appends one chosen token to s, with its logprobs (raw: the position's log-softmax), checks stops and
        moves its grammar on (advanced: the grammar has already taken the token). Returns whether the token
        ended s's reasoning, so that its grammar starts with the next one (the tokens after it in a
        speculative step were chosen without the grammar)."""
        s.token_ids.append(token)
        self.num_generated += 1
        if s.params.logprobs is not None:
            entry = self.outputs.make_logprobs(token_logprobs(raw, token, s.params.logprobs))
            s.logprobs.append(entry)
            s.cumulative_logprob += entry[token].logprob
        self.check_stop(s, token)
        if s.matcher is not None:
            self.advance_grammar(s, token, advanced)
        elif s.reasoning is not None:
            return self.end_reasoning(s, token)
        return False

    def end_reasoning(self, s: Sequence, token: int) -> bool:
        """Whether token ends s's reasoning (reasoning_end.py); then its grammar takes over."""
        rest = self.reasoning_end.rest_after_end(s, token)
        if rest is None:
            return False
        self.reasoning_end.take_up(s, rest)
        self.advance_grammar(s, token, advanced=True)  # finishes s if the text after the marker completed it
        return True

    def choose_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], set[int]]:
        """Each row's token, and the rows whose grammar has already taken it (grammar.sample_in_grammar)."""
        if all(s.matcher is None for s in seqs):
            return sample(logits, seqs, self.generator).tolist(), set()
        return sample_in_grammar(self.grammars, logits, seqs, self.generator, self.cfg.grammar_check_first)

    def advance_grammar(self, s: Sequence, token: int, advanced: bool = False):
        """The grammar follows the sampled token (unless it has already); a grammar that is complete finishes
        its sequence."""
        if not advanced and not s.matcher.consume_token(token):
            log.error("structured outputs: token %d was refused by the grammar (%s)", token, s.matcher.get_error())
        if s.matcher.is_stopped() and not s.is_finished:  # complete, or in error (which also stops it)
            s.finish("stop")

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
            s.text = s.text[:i + len(x) if s.params.include_stop_str_in_output else i]
            s.finish("stop", x)

    def request_output(self, request_id: str) -> RequestOutput | None:
        prompt, seqs = self.requests[request_id]
        done = all(s.is_finished for s in seqs)
        if done:
            del self.requests[request_id]
        elif seqs[0].params.output_kind == "final_only":
            return None
        return self.outputs.request_output(request_id, prompt, seqs)


def load_tokenizer(path: Path) -> Tokenizer | None:
    if not (path / "tokenizer.json").is_file():
        log.warning("no tokenizer.json in %s: give prompts as {'prompt_token_ids': [...]}; output text will be "
                    "empty", path)
        return None
    return Tokenizer(path)
