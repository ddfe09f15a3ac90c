"""OpenAI response and stream-chunk bodies for completions and chat completions."""
import time
import uuid

from dsinfer.outputs import CompletionOutput


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(out: CompletionOutput, offset: int) -> dict | None:
    """The legacy completions format: tokens, token_logprobs, top_logprobs (the top k and the chosen token),
    text_offset."""
    if out.logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    for tid, entry in zip(out.token_ids, out.logprobs):
        text = entry[tid].decoded_token or str(tid)
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        lps.append(entry[tid].logprob)
        tops.append({lp.decoded_token or str(t): lp.logprob for t, lp in entry.items()})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


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
