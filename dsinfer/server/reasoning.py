"""`--reasoning-parser deepseek_r1`: R1-style output, `<think>reasoning</think>answer`, split into
reasoning_content and content, as vLLM's deepseek_r1 parser does (R1's template opens the <think> block in the
prompt, so output without </think> is all reasoning)."""

START, END = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning_content, content): before and after </think>, a leading <think> dropped; everything is
    reasoning until </think> appears; None for an empty part."""
    if text.startswith(START):
        text = text[len(START):]
    reasoning, end, content = text.partition(END)
    return reasoning or None, (content or None) if end else None


def held_back(text: str, *tags: str) -> int:
    """How many trailing characters of text could begin one of the tags (wait for the next delta)."""
    return max((k for tag in tags for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)


class ReasoningStream:
    """Turns a choice's streamed text deltas into (reasoning delta, content delta), by splitting the whole text
    so far and handing out what is new on each side; the start of a tag is held back until it is complete."""

    def __init__(self):
        self.text, self.sent_reasoning, self.sent_content = "", 0, 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        ready = self.text if final else self.text[:len(self.text) - held_back(self.text, START, END)]
        reasoning, content = split_reasoning(ready)
        reasoning, content = reasoning or "", content or ""
        out = reasoning[self.sent_reasoning:], content[self.sent_content:]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return out
