"""SamplingParams with vLLM's names and meanings; invalid values raise ValueError naming the field."""
from dataclasses import dataclass, field

OUTPUT_KINDS = ("cumulative", "delta", "final_only")
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(slots=True)
class StructuredOutputsParams:
    """vLLM's structured-output constraint: exactly one of a JSON schema (a dict or its JSON text), a regex, a
    list of choices, a grammar (Lark, or GBNF with ::= rules) or json_object (any JSON object). Between JSON
    tokens goes at most one space, none with disable_any_whitespace, or what whitespace_pattern (a regex) allows."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self):
        given = [name for name in CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("SamplingParams.structured_outputs must set exactly one of "
                             f"{', '.join(CONSTRAINTS)}; got {given or 'none'}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"SamplingParams.structured_outputs.choice must be a non-empty list of strings, "
                             f"got {self.choice!r:.80}")
        for name in ("regex", "grammar", "whitespace_pattern"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"SamplingParams.structured_outputs.{name} must be a string")

    @property
    def kind(self) -> str:
        return next(name for name in CONSTRAINTS if getattr(self, name) not in (None, False))


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: str = "cumulative"  # vLLM's RequestOutputKind: cumulative, delta (new text only) or final_only
    logit_bias: dict[int, float] | None = None  # added to the logits before sampling; JSON's string keys accepted
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # words whose tokens must not be generated
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens
    structured_outputs: StructuredOutputsParams | None = None  # output constrained to a schema or grammar
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = _int_keys(self.logit_bias)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self):
        _int("n", self.n, 1)
        _num("temperature", self.temperature, 0, None, "must be >= 0")
        _num("top_p", self.top_p, 0, 1, "must be in (0, 1]")
        if self.top_p == 0:
            raise ValueError("SamplingParams.top_p must be in (0, 1], got 0")
        _int("top_k", self.top_k, -1)
        _num("min_p", self.min_p, 0, 1, "must be in [0, 1]")
        if self.seed is not None:
            _int("seed", self.seed, None)
            if not -2**63 <= self.seed <= 2**64 - self.n:  # sample i seeds a torch generator with seed + i
                raise ValueError(f"SamplingParams.seed must be in [-2**63, 2**64 - n], got {self.seed}")
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1)
        _int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("presence_penalty", "frequency_penalty"):
            _num(name, getattr(self, name), -2, 2, "must be in [-2, 2]")
        _num("repetition_penalty", self.repetition_penalty, 0, None, "must be > 0")
        if self.repetition_penalty == 0:
            raise ValueError("SamplingParams.repetition_penalty must be > 0, got 0")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 0)
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"SamplingParams.output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        if not all(isinstance(s, str) and s for s in self.stop_list):
            raise ValueError(f"SamplingParams.stop must be a non-empty string or a list of them, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        self.validate_logit_rules()

    def validate_logit_rules(self):
        """logit_bias, allowed_token_ids, bad_words, include_stop_str_in_output and truncate_prompt_tokens."""
        for value in (self.logit_bias or {}).values():
            _num("logit_bias", value, -100, 100, "values must be in [-100, 100]")
        _token_ids("logit_bias", list(self.logit_bias or {}), "keys")
        if self.allowed_token_ids is not None:
            _token_ids("allowed_token_ids", self.allowed_token_ids, "")
            if not self.allowed_token_ids:
                raise ValueError("SamplingParams.allowed_token_ids must not be empty")
        if self.bad_words is not None and (not isinstance(self.bad_words, list)
                                           or not all(isinstance(w, str) and w.strip() for w in self.bad_words)):
            raise ValueError(f"SamplingParams.bad_words must be a list of non-blank strings, got {self.bad_words!r}")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ValueError("SamplingParams.include_stop_str_in_output must be a bool, "
                             f"got {self.include_stop_str_in_output!r}")
        if self.truncate_prompt_tokens is not None:
            _int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("SamplingParams.structured_outputs must be a StructuredOutputsParams, "
                             f"got {type(self.structured_outputs).__name__}")


def _int_keys(bias) -> dict[int, float] | None:
    """logit_bias with int keys (JSON object keys arrive as strings)."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"SamplingParams.logit_bias must be a dict of token id to bias, got {bias!r:.80}")
    try:
        return {int(k) if isinstance(k, str) else k: v for k, v in bias.items()}
    except ValueError:
        raise ValueError(f"SamplingParams.logit_bias keys must be token ids, got {list(bias)[:5]!r}") from None


def _token_ids(name, ids, what):
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"SamplingParams.{name} {what + ' ' if what else ''}must be non-negative token ids, "
                         f"got {ids!r:.80}")


def _int(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"SamplingParams.{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"SamplingParams.{name} must be >= {low}, got {value}")


def _num(name, value, low, high, rule):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"SamplingParams.{name} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"SamplingParams.{name} {rule}, got {value}")
