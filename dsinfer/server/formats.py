"""Turns collected choices or streamed deltas into OpenAI's completion and chat bodies."""
from collections.abc import AsyncIterator

from dsinfer.server import responses as R


def completion_answer(h, rid, choices, prompt_tokens) -> dict:
    """With echo, each choice's text and logprobs start with its prompt's."""
    out = [{"index": i, "text": (c.echo.text if c.echo else "") + c.text, "finish_reason": c.finish_reason,
            "logprobs": R.completion_logprobs(c, 0, c.echo) if c.logprobs is not None else None}
           for i, c in choices.items()]
    completion_tokens = sum(len(c.token_ids) for c in choices.values())
    return R.completion_body(rid, h.model_name, out, R.usage(prompt_tokens, completion_tokens))


def chat_answer(h, rid, choices, prompt_tokens, top_logprobs) -> dict:
    out = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
            "logprobs": R.chat_logprobs(c, top_logprobs) if c.logprobs is not None else None}
           for i, c in choices.items()]
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


async def chat_chunks(h, rid, deltas, prompt_tokens, include_usage, top_logprobs, timer) -> AsyncIterator[dict]:
    """Per choice: a first chunk with the role, content chunks, then a chunk with the finish reason."""
    completion_tokens = 0
    async for index, c, first in deltas:
        completion_tokens += len(c.token_ids)
        if first:
            yield R.chat_body(rid, h.model_name, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}], None, chunk=True)
        if c.text or c.token_ids:
            logprobs = R.chat_logprobs(c, top_logprobs) if c.logprobs is not None else None
            yield R.chat_body(rid, h.model_name, [{"index": index, "delta": {"content": c.text},
                                                   "logprobs": logprobs, "finish_reason": None}], None, chunk=True)
        if c.finish_reason:
            yield R.chat_body(rid, h.model_name, [{"index": index, "delta": {}, "logprobs": None,
                                                   "finish_reason": c.finish_reason}], None, chunk=True)
    timer.done()
    if include_usage:
        yield R.chat_body(rid, h.model_name, [], R.usage(prompt_tokens, completion_tokens), chunk=True)
