"""A chat choice's text as OpenAI's message: reasoning split off (`--reasoning-parser`), DeepSeek-V3 tool calls
parsed out (when the request has tools), whole or as stream deltas; and what a request with tools asks of the
engine (the template's tools, special tokens kept in the text, the grammar of a forced call)."""
from dataclasses import dataclass, replace

from dsinfer.sampling_params import StructuredOutputsParams
from dsinfer.server.reasoning import ReasoningStream, split_reasoning
from dsinfer.server.tool_calls import ToolCallStream, parse_tool_calls, tool_grammar


@dataclass(slots=True)
class ChatShape:
    """How a chat request's choices are read: reasoning split (a parser is set), tool calls parsed (tools in
    auto, required or named mode), and whether a call means finish_reason tool_calls (not for a named one)."""
    reasoning: bool = False
    tools: bool = False
    named: bool = False

    def message(self, text: str) -> dict:
        reasoning, content = split_reasoning(text) if self.reasoning else (None, text)
        msg = {"role": "assistant", "content": content}
        if self.reasoning:
            msg["reasoning_content"] = reasoning
        if self.tools and content:
            content, calls = parse_tool_calls(content)
            if calls:
                msg["content"], msg["tool_calls"] = content, calls
        return msg

    def finish_reason(self, msg_or_stream, reason: str | None) -> str | None:
        called = (msg_or_stream.get("tool_calls") if isinstance(msg_or_stream, dict)
                  else msg_or_stream.called)
        return "tool_calls" if called and reason == "stop" and not self.named else reason


class ChoiceStream:
    """One choice's text deltas -> OpenAI delta dicts (content, reasoning_content, tool_calls)."""

    def __init__(self, shape: ChatShape):
        self.reasoning = ReasoningStream() if shape.reasoning else None
        self.tools = ToolCallStream() if shape.tools else None

    @property
    def called(self) -> bool:
        return self.tools is not None and self.tools.called

    def feed(self, delta: str, final: bool) -> list[dict]:
        out = []
        if self.reasoning is not None:
            reasoning, delta = self.reasoning.feed(delta, final)
            out += [{"reasoning_content": reasoning}] if reasoning else []
        if self.tools is not None:
            return out + self.tools.feed(delta, final)
        return out + ([{"content": delta}] if delta else [])


def tool_params(req, params, tokenizer):
    """The request's SamplingParams for its tools: special tokens kept in the text (the calls are spelled with
    them) and, for tool_choice required or a named function, the grammar of such calls."""
    mode = req.tool_mode
    if mode == "none":
        return params
    params = replace(params, skip_special_tokens=False)
    if mode in ("auto",):
        return params
    if params.structured_outputs is not None:
        raise ValueError("SamplingParams.structured_outputs cannot be combined with tool_choice required or a "
                         "named function, which constrain the output themselves")
    tools = [t.model_dump() for t in req.tools]
    named = req.tool_choice.function.name if mode == "named" else None
    if named is not None and named not in [t["function"]["name"] for t in tools]:
        raise ValueError(f"SamplingParams.tool_choice names the function {named!r}, which is not among the tools")
    grammar = tool_grammar(tools, named, lambda text: tokenizer.convert_tokens_to_ids(text) if tokenizer else None,
                           several=req.parallel_tool_calls and named is None)
    return replace(params, structured_outputs=StructuredOutputsParams(grammar=grammar))
