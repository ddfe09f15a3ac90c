"""Turns collected choices or streamed deltas into OpenAI's completion and chat bodies."""
from collections.abc import AsyncIterator

from dsinfer.server import responses as R
from dsinfer.server.chat_output import ChatShape, ChoiceStream


def completion_answer(h, rid, choices, prompt_tokens) -> dict:
    """With echo, each choice's text and logprobs start with its prompt's."""
    out = [{"index": i, "text": (c.echo.text if c.echo else "") + c.text, "finish_reason": c.finish_reason,
            "logprobs": R.completion_logprobs(c, 0, c.echo) if c.logprobs is not None else None}
           for i, c in choices.items()]
    completion_tokens = sum(len(c.token_ids) for c in choices.values())
    return R.completion_body(rid, h.model_name, out, R.usage(prompt_tokens, completion_tokens))


def chat_answer(h, rid, choices, prompt_tokens, top_logprobs, shape: ChatShape) -> dict:
    out = []
    for i, c in choices.items():
        msg = shape.message(c.text)
        out.append({"index": i, "message": msg, "finish_reason": shape.finish_reason(msg, c.finish_reason),
                    "logprobs": R.chat_logprobs(c, top_logprobs) if c.logprobs is not None else None})
    completion_tokens = sum(len(c.token_ids) for c in choices.values())
    return R.chat_body(rid, h.model_name, out, R.usage(prompt_tokens, completion_tokens))


async def completion_chunks(h, rid, deltas, prompt_tokens, include_usage, timer) -> AsyncIterator[dict]:
    """With echo, a choice's first chunk starts with its prompt's text and logprobs (deltas give its Echo)."""
    completion_tokens, offsets = 0, {}
    async for index, c, first in deltas:
        echo = None if isinstance(first, bool) else first
        completion_tokens += len(c.token_ids)
        logprobs = R.completion_logprobs(c, offsets.get(index, 0), echo) if c.logprobs is not None else None
        text = (echo.text if echo else "") + c.text
        offsets[index] = offsets.get(index, 0) + len(text)
        yield R.completion_body(rid, h.model_name, [{"index": index, "text": text, "logprobs": logprobs,
                                                     "finish_reason": c.finish_reason}], None, chunk=True)
    timer.done()
    if include_usage:
        yield R.completion_body(rid, h.model_name, [], R.usage(prompt_tokens, completion_tokens), chunk=True)


async def chat_chunks(h, rid, deltas, prompt_tokens, include_usage, top_logprobs, timer,
                      shape: ChatShape) -> AsyncIterator[dict]:
    """Per choice: a first chunk with the role, delta chunks (content; with a parser, also reasoning_content and
    tool_calls), then a chunk with the finish reason."""
    completion_tokens, streams = 0, {}
    async for index, c, first in deltas:
        completion_tokens += len(c.token_ids)
        if first:
            streams[index] = ChoiceStream(shape)
            yield R.chat_body(rid, h.model_name, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}], None, chunk=True)
        logprobs = R.chat_logprobs(c, top_logprobs) if c.logprobs is not None else None
        for delta in chat_deltas(streams[index], shape, c, logprobs is not None):
            yield R.chat_body(rid, h.model_name, [{"index": index, "delta": delta, "logprobs": logprobs,
                                                   "finish_reason": None}], None, chunk=True)
            logprobs = None
        if c.finish_reason:
            reason = shape.finish_reason(streams[index], c.finish_reason)
            yield R.chat_body(rid, h.model_name, [{"index": index, "delta": {}, "logprobs": None,
                                                   "finish_reason": reason}], None, chunk=True)
    timer.done()
    if include_usage:
        yield R.chat_body(rid, h.model_name, [], R.usage(prompt_tokens, completion_tokens), chunk=True)


def chat_deltas(stream: ChoiceStream, shape: ChatShape, c, has_logprobs: bool) -> list[dict]:
    """The delta dicts of one engine output; without a parser, a content delta for every output with tokens
    (even an empty text: a character still incomplete), so that its logprobs are sent."""
    if not (shape.reasoning or shape.tools):
        return [{"content": c.text}] if c.text or c.token_ids else []
    out = stream.feed(c.text, bool(c.finish_reason))
    return out or ([{"content": ""}] if has_logprobs else [])
