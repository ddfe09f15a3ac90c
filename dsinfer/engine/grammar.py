"""Structured outputs with llguidance: a request's StructuredOutputsParams compiled once into a grammar, a
matcher per sequence that follows its output tokens, and the allowed-token bitmasks of a whole batch, one
[B, V / 32] tensor per step. The masks are computed in the engine's thread, row by row: llguidance's thread pool
(LLExecutor) measured no faster for 8 rows on 2 cores, and its spinning workers slow the forward pass's own."""
import functools
import json
import threading

import llguidance
from llguidance.gbnf_to_lark import any_to_lark
import llguidance.torch as llg_torch
import torch

from dsinfer.sampling_params import StructuredOutputsParams


class GrammarError(ValueError):
    """A schema, regex, choice list or grammar llguidance cannot compile; the message names the field."""


SPARING_WHITESPACE = "[ ]?"  # at most one space between JSON tokens


def json_options(so: StructuredOutputsParams) -> dict:
    """llguidance's JSON compile options: compact with disable_any_whitespace, whitespace_pattern where given, and
    otherwise at most a space between tokens (free whitespace lets a weak model spend its whole budget on
    newlines and never close the object)."""
    if so.disable_any_whitespace:
        return {"whitespace_flexible": False}
    return {"whitespace_flexible": True, "whitespace_pattern": so.whitespace_pattern or SPARING_WHITESPACE}


def json_schema(so: StructuredOutputsParams) -> dict | str:
    schema = {"type": "object"} if so.kind == "json_object" else so.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise GrammarError(f"SamplingParams.structured_outputs.json is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("SamplingParams.structured_outputs.json must be a JSON schema object")
    if so.disable_additional_properties and isinstance(schema, dict):
        schema = no_additional_properties(schema)
    return schema


def no_additional_properties(schema):
    """The schema with additionalProperties false on every object that does not set it."""
    if isinstance(schema, list):
        return [no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: no_additional_properties(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def grammar_text(so: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (not yet checked)."""
    kind = so.kind
    if kind in ("json", "json_object"):
        return llguidance.LLMatcher.grammar_from_json_schema(json_schema(so), overrides=json_options(so))
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(so.regex)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
    return llguidance.LLMatcher.grammar_from_lark(any_to_lark(so.grammar))


class Grammars:
    """The engine's grammar engine: llguidance's view of the tokenizer (built on first use) and compiled grammars
    by constraint."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self.lock = threading.Lock()
        self._tok = None
        self.compiled = functools.lru_cache(maxsize=256)(self._compile)

    @property
    def ll_tokenizer(self):
        with self.lock:
            if self._tok is None:
                if self.tokenizer is None:
                    raise GrammarError("SamplingParams.structured_outputs needs a tokenizer, and this model "
                                       "directory has none")
                self._tok = llguidance.LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=self.vocab_size,
                                                   eos_token=self.eos_ids)
            return self._tok

    def check(self, so: StructuredOutputsParams | None) -> str | None:
        """The constraint's grammar, compiled once and cached; GrammarError names the field when it is invalid."""
        if so is None:
            return None
        return self.compiled(key(so))

    def _compile(self, cache_key: str) -> str:
        so = StructuredOutputsParams(**json.loads(cache_key))
        try:
            grammar = grammar_text(so)
        except ValueError as exc:
            raise GrammarError(f"SamplingParams.structured_outputs.{so.kind} is invalid: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            raise GrammarError(f"SamplingParams.structured_outputs.{so.kind} is invalid: {error.strip()}")
        return grammar

    def matcher(self, grammar: str):
        """A fresh matcher at the grammar's start."""
        m = llguidance.LLMatcher(self.ll_tokenizer, grammar)
        if m.is_error():
            raise GrammarError(f"SamplingParams.structured_outputs is invalid: {m.get_error()}")
        return m

    def fill_masks(self, matchers: list) -> torch.Tensor:
        """int32 [B, ceil(V / 32)]: bit t of row i set where matcher i allows token t next."""
        mask = torch.full(llg_torch.get_bitmask_shape(len(matchers), self.vocab_size), -1, dtype=torch.int32)
        for i, m in enumerate(matchers):
            llg_torch.fill_next_token_bitmask(m, mask, i)
        return mask


def key(so: StructuredOutputsParams) -> str:
    """A constraint as canonical JSON text: the compiled grammars' cache key."""
    fields = {name: getattr(so, name) for name in so.__slots__}
    return json.dumps(fields, sort_keys=True)
