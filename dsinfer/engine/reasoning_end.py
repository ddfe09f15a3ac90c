"""Structured outputs after the reasoning (EngineConfig.reasoning_parser, vLLM's `--reasoning-parser`): with an
R1-style parser a constrained sequence writes `<think>reasoning</think>` freely, and its grammar starts with the
first token after the end marker.

The end is found as a token id where the tokenizer has `</think>` as one token (DeepSeek-R1 and V3.1's have),
exactly. Otherwise it is found in the detokenized text; when the token that completes the marker carries more
text after it, that rest is encoded and handed to the grammar (which may refuse it: then the rest stays before
the constrained part and the output may not follow the grammar; a warning says so). A prompt whose last marker
is `</think>` (a template that turns thinking off) starts constrained, as vLLM decides it."""
import logging
from dataclasses import dataclass

log = logging.getLogger("dsinfer")

PARSERS = ("deepseek_r1",)
START, END = "<think>", "</think>"


@dataclass(slots=True)
class Reasoning:
    """A sequence still reasoning: the grammar it takes up after the end marker, and how much of its text has
    been searched for the marker."""
    matcher: object
    searched: int = 0


class ReasoningEnd:
    """Where a tokenizer's sequences end their reasoning: by token id (end_id) or, without one, by text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.start_id, self.end_id = single_token(tokenizer, START), single_token(tokenizer, END)

    def ended_in_prompt(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt's last marker closes a reasoning (the output then starts constrained)."""
        if self.end_id is not None:
            return next((t for t in reversed(prompt_ids) if t in (self.start_id, self.end_id)), None) == self.end_id
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        return text.rfind(END) > text.rfind(START)

    def rest_after_end(self, s, token: int) -> str | None:
        """None while s is still reasoning after its new token; once the token ends the reasoning, the text the
        same token carried past the marker ("" by token id)."""
        if self.end_id is not None:
            return "" if token == self.end_id else None
        state, text = s.reasoning, s.text
        at = text.find(END, max(0, state.searched - len(END) + 1))
        state.searched = len(text)
        return None if at < 0 else text[at + len(END):]

    def take_up(self, s, rest: str):
        """s's grammar after the marker: the text past it (by text only) goes to the grammar first."""
        matcher, s.reasoning = s.reasoning.matcher, None
        if rest:
            ids = self.tokenizer.encode(rest, add_special_tokens=False)
            if matcher.try_consume_tokens(ids) != len(ids):
                log.warning("structured outputs: the text %r after %s (in the same token) does not start what the "
                            "grammar allows; the output may not follow it", rest, END)
        s.matcher = matcher


def single_token(tokenizer, text: str) -> int | None:
    """The id of text where the tokenizer has it as one token that decodes back to it, else None."""
    tid = tokenizer.convert_tokens_to_ids(text)
    if tid is None or tokenizer.decode([tid], skip_special_tokens=False) != text:
        return None
    return tid
