"""OpenAI response and stream-chunk bodies for completions and chat completions."""
import time
import uuid

from dsinfer.outputs import CompletionOutput


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(out: CompletionOutput, offset: int, echo=None) -> dict | None:
    """The legacy completions format: tokens, token_logprobs, top_logprobs (the top k and the chosen token),
    text_offset. An Echo (handlers.Echo) puts its prompt tokens first, the first with null logprobs."""
    if out.logprobs is None:
        return None
    rows = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if echo is not None:
        add_rows(rows, echo.token_ids, echo.logprobs or [None] * len(echo.token_ids), offset, echo.first_token)
        offset += len(echo.text)
    return add_rows(rows, out.token_ids, out.logprobs, offset)


def add_rows(rows: dict, token_ids: list[int], entries: list, offset: int, first_token: str = "") -> dict:
    """Appends a token per id to the legacy logprobs rows; an entry of None (the prompt's first token) has null
    logprobs and first_token for its string."""
    for tid, entry in zip(token_ids, entries):
        text = first_token if entry is None else entry[tid].decoded_token or str(tid)
        rows["text_offset"].append(offset)
        offset += len(text)
        rows["tokens"].append(text)
        rows["token_logprobs"].append(None if entry is None else entry[tid].logprob)
        rows["top_logprobs"].append(None if entry is None else
                                    {lp.decoded_token or str(t): lp.logprob for t, lp in entry.items()})
    return rows


def chat_logprobs(out: CompletionOutput, top: int) -> dict | None:
    if out.logprobs is None:
        return None
    content = []
    for tid, entry in zip(out.token_ids, out.logprobs):
        text = entry[tid].decoded_token or str(tid)
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)[:top]
        content.append({"token": text, "logprob": entry[tid].logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": lp.decoded_token, "logprob": lp.logprob,
                                          "bytes": list((lp.decoded_token or "").encode())} for lp in ranked]})
    return {"content": content}


def completion_body(rid: str, model: str, choices: list[dict], usage_: dict | None, chunk: bool = False) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_body(rid: str, model: str, choices: list[dict], usage_: dict | None, chunk: bool = False) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body
