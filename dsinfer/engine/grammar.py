"""Structured outputs with llguidance: a request's StructuredOutputsParams compiled once into a grammar, a
matcher per sequence that follows its output tokens, and the allowed-token bitmasks of the rows that need them,
[R, V / 32] per step. With grammar_check_first (sample_in_grammar) a row is sampled unmasked first and its mask
computed only when the grammar refuses the token, which is the same token as masking first would draw. The
masks are computed in the engine's thread, row by row: llguidance's thread pool (LLExecutor) measured no faster
for 8 rows on 2 cores, and its spinning workers slow the forward pass's own. With share_lexer, a sequence's
matcher is a copy of one template per grammar, so it starts with the lexer states earlier sequences built."""
import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
from llguidance.gbnf_to_lark import any_to_lark
import torch

from dsinfer import kernels
from dsinfer.engine.sampler import apply_token_masks, mask_rows, sample_scores
from dsinfer.sampling_params import StructuredOutputsParams


class GrammarError(ValueError):
    """A schema, regex, choice list or grammar llguidance cannot compile; the message names the field."""


FORKS_PER_TEMPLATE = 256  # sequences a template serves before a fresh one starts (bounds its shared lexer states)
MAX_TEMPLATES = 64  # grammars that keep a template; the least recently used goes first


@dataclass(slots=True)
class Template:
    """A matcher at a grammar's start that sequences' matchers are copied from. llguidance's deep_copy shares
    the lexer's states (built lazily as masks and tokens need them) between a matcher and its copies, so a copy
    starts with every state its predecessors built instead of building them again."""
    matcher: object
    forks: int = 0


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

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], kernel: bool = False,
                 share_lexer: bool = True, lean_refusal: bool = True):
        """kernel: masks applied to the logits in C (kernels.token_mask) rather than by torch's ops. share_lexer:
        matchers copied from a template per grammar (Template) rather than each built from the grammar.
        lean_refusal (with kernel): a refused row's mask and best token through buffers made once
        (kernels.RowArgmax) rather than fill_masks and token_argmax."""
        self.tokenizer, self.vocab_size, self.eos_ids, self.kernel = tokenizer, vocab_size, eos_ids, kernel
        self.share_lexer, self.templates = share_lexer, OrderedDict()
        lean = lean_refusal and kernel and kernels.library() is not None
        self.row_argmax = kernels.RowArgmax(vocab_size) if lean else None
        self.lock = threading.RLock()
        self._tok = None
        self.compiled = functools.lru_cache(maxsize=256)(self._compile)
        self.buffer = torch.empty(0, (vocab_size + 31) // 32, dtype=torch.int32)  # fill_masks' rows

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
        """A fresh matcher at the grammar's start (with share_lexer, a copy of the grammar's template)."""
        if not self.share_lexer:
            return self.new_matcher(grammar)
        with self.lock:
            t = self.templates.pop(grammar, None)
            if t is None or t.forks >= FORKS_PER_TEMPLATE:
                t = Template(self.new_matcher(grammar))
            t.forks += 1
            self.templates[grammar] = t
            if len(self.templates) > MAX_TEMPLATES:
                self.templates.popitem(last=False)
            return t.matcher.deep_copy()

    def new_matcher(self, grammar: str):
        """A matcher built from the grammar."""
        m = llguidance.LLMatcher(self.ll_tokenizer, grammar)
        if m.is_error():
            raise GrammarError(f"SamplingParams.structured_outputs is invalid: {m.get_error()}")
        return m

    def fill_masks(self, matchers: list) -> torch.Tensor:
        """int32 [B, ceil(V / 32)]: bit t of row i set where matcher i allows token t next. A view of a buffer
        that the next call overwrites."""
        words = (self.vocab_size + 31) // 32
        if self.buffer.shape[0] < len(matchers):
            self.buffer = torch.empty(max(len(matchers), 2 * self.buffer.shape[0]), words, dtype=torch.int32)
        base = self.buffer.data_ptr()
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(base + 4 * words * i, 4 * words)
        return self.buffer[:len(matchers)]

    def mask(self, logits: torch.Tensor, seqs: list, rows: list[int]) -> torch.Tensor:
        """logits [B, V] with rows[j] masked in place to what seqs[rows[j]]'s grammar allows next."""
        return apply_token_masks(logits, seqs, rows, self.fill_masks([seqs[i].matcher for i in rows]), self.kernel)

    def advance_or_refuse(self, seqs: list, rows: list[int], tokens: list[int]) -> list[int]:
        """Each row's grammar takes its token where it allows it; returns the rows whose grammar refused theirs
        (those grammars stay where they were)."""
        return [i for i in rows if not seqs[i].matcher.try_consume_tokens([tokens[i]])]

    def best_allowed(self, scores: torch.Tensor, seqs: list, rows: list[int]) -> list[int]:
        """Each row's token of largest score among those its grammar allows next (scores left as they are)."""
        if self.row_argmax is not None and self.row_argmax.fits(scores):
            return self.best_allowed_lean(scores, seqs, rows)
        bitmask = self.fill_masks([seqs[i].matcher for i in rows])
        if self.kernel and kernels.token_mask_usable(scores):
            return kernels.token_argmax(scores, rows, bitmask)
        return best_allowed(scores, rows, bitmask)

    def best_allowed_lean(self, scores: torch.Tensor, seqs: list, rows: list[int]) -> list[int]:
        """best_allowed row by row: each mask written into RowArgmax's buffer and read there by one C call."""
        best, base, row_bytes = self.row_argmax, scores.data_ptr(), 4 * scores.stride(0)
        mask_ptr, mask_bytes, out = best.mask_ptr, best.mask_bytes, []
        for i in rows:
            seqs[i].matcher.unsafe_compute_mask_ptr(mask_ptr, mask_bytes)
            out.append(best(base + i * row_bytes))
        return out


def best_allowed(scores: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> list[int]:
    """[len(rows)]: row rows[j]'s argmax over the tokens bitmask[j] allows; the torch path of kernels.token_argmax."""
    return mask_rows(scores[rows], list(range(len(rows))), bitmask).argmax(-1).tolist()


def check_first_fits(s, vocab: int) -> bool:
    """Whether a grammar row's masked sample is its unmasked sample whenever the grammar allows that one: no
    rules of its own that could leave the grammar no token, and no top-k / top-p / min-p (which a mask moves)."""
    p = s.params
    if s.rules is not None or s.num_outputs < p.min_tokens:
        return False
    return p.greedy or ((p.top_k <= 0 or p.top_k >= vocab) and p.top_p >= 1 and not p.min_p)


def sample_in_grammar(grammars: Grammars, logits: torch.Tensor, seqs: list, generator,
                      check_first: bool) -> tuple[list[int], set[int]]:
    """Each row's token [B], a grammar row's within its grammar, and the rows whose grammar has already taken
    its token. Rows that check_first_fits (with check_first) are sampled unmasked and their grammar tries the
    token; only a refused row computes its mask and takes the best allowed token of the same scores, which is
    the token masking first would have drawn. The other grammar rows are masked before sampling."""
    later, now, vocab = [], [], logits.shape[1]
    for i, s in enumerate(seqs):  # one pass: on caches cold from the forward pass, each costs microseconds
        if s.matcher is not None:
            (later if check_first and check_first_fits(s, vocab) else now).append(i)
    if now:
        logits = grammars.mask(logits, seqs, now)
    scores = sample_scores(logits, seqs, generator)
    tokens = scores.argmax(-1).tolist()
    refused = grammars.advance_or_refuse(seqs, later, tokens) if later else []
    if refused:
        for i, t in zip(refused, grammars.best_allowed(scores, seqs, refused)):
            tokens[i] = t
    return tokens, set(later).difference(refused)


def key(so: StructuredOutputsParams) -> str:
    """A constraint as canonical JSON text: the compiled grammars' cache key."""
    fields = {name: getattr(so, name) for name in so.__slots__}
    return json.dumps(fields, sort_keys=True)
