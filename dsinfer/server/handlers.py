"""What /v1/completions and /v1/chat/completions do: check the request against the model, run its prompts
through the async engine, and shape the results as OpenAI answers or stream chunks."""
import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dsinfer.engine.async_engine import QueueFull
from dsinfer.outputs import CompletionOutput
from dsinfer.server.errors import ApiError
from dsinfer.server.protocol import ChatCompletionRequest, CompletionRequest


@dataclass(slots=True)
class Choice:
    text: str = ""
    token_ids: list = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None
    echo: "Echo | None" = None


@dataclass(slots=True)
class Echo:
    """The prompt an echo choice starts with: its text, token ids, the first token's string ("" where the text
    does not start with it, as a tokenizer-added BOS) and the engine's prompt logprobs (None without logprobs)."""
    text: str
    token_ids: list[int]
    first_token: str
    logprobs: list | None = None


class Prompts(list):
    """A completion request's (text, token ids) prompts, with what its echo asks for."""
    echo: bool = False
    drop_output: bool = False  # max_tokens 0: the one token generated (the engine needs one) is dropped


class Started(list):
    """(request id, output queue) per prompt, with the prompts they came from."""
    prompts: Prompts | None = None


class Handler:
    def __init__(self, async_llm, model_name: str, max_tokens_cap: int, metrics=None, max_waiting: int | None = None):
        self.llm, self.model_name, self.cap, self.metrics = async_llm, model_name, max_tokens_cap, metrics
        self.max_waiting = max_waiting
        self.tokenizer = async_llm.llm.tokenizer
        self.max_model_len = async_llm.llm.max_model_len

    def check_model(self, name: str | None):
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        if req.suffix:
            raise ApiError(400, "suffix is not supported by this server", "suffix", "unsupported")
        self.check_echo(req)
        if req.best_of not in (None, req.n):
            raise ApiError(400, "best_of is not supported by this server (leave it out or equal to n)", "best_of")
        p = req.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items:
            raise ApiError(400, "prompt is empty", "prompt")
        prompts = Prompts(self.encode(item, "prompt") for item in items)
        prompts.echo, prompts.drop_output = req.echo, req.max_tokens == 0
        return prompts

    def check_echo(self, req: CompletionRequest):
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens must be >= 1 (0 is allowed only with echo)", "max_tokens",
                           "invalid_value")
        if req.echo and self.tokenizer is None:
            raise ApiError(400, "echo needs the model's tokenizer, and this model has none", "echo", "unsupported")

    def echo_of(self, prompt: tuple[str | None, list[int]], out) -> Echo:
        """The Echo of a prompt, from the first output of its request."""
        text, ids = prompt
        text = self.tokenizer.decode(ids, False) if text is None else text
        first = self.tokenizer.decode(ids[:1], False)
        return Echo(text, ids, first if text.startswith(first) else "", out.prompt_logprobs)

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        conv = [m.for_template() for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            prompt = self.llm.llm.chat_prompt(conv, add_generation_prompt=req.add_generation_prompt, tools=tools)
        except Exception as exc:  # a template error is the request's problem, not the server's
            raise ApiError(400, f"messages could not be formatted by the chat template: {exc}", "messages")
        return prompt["prompt"], prompt["prompt_token_ids"]

    def encode(self, item, param: str) -> tuple[str | None, list[int]]:
        if isinstance(item, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: give the prompt as token ids", param)
            try:
                return item, self.tokenizer.encode(item)
            except (ValueError, TypeError) as exc:  # a lone surrogate cannot be encoded
                raise ApiError(400, f"{param} could not be tokenized: {exc}", param, "invalid_value")
        return None, list(item)

    def max_tokens(self, requested: int | None, prompts: list[list[int]], param: str, prompt_param: str) -> int:
        """The completion budget: what was asked for, capped by the server; it must fit the context."""
        longest = max(len(ids) for ids in prompts)
        if longest >= self.max_model_len:
            raise ApiError(400, f"the prompt has {longest} tokens, but this model's maximum context length is "
                           f"{self.max_model_len} tokens", prompt_param, "context_length_exceeded")
        if requested is None:
            return min(self.cap, self.max_model_len - longest)
        if requested > self.cap:
            raise ApiError(400, f"{param} is {requested}, above this server's cap of {self.cap}", param)
        if longest + requested > self.max_model_len:
            raise ApiError(400, f"this model's maximum context length is {self.max_model_len} tokens, but "
                           f"{longest + requested} were requested ({longest} in the prompt, {requested} for the "
                           f"completion)", param, "context_length_exceeded")
        return requested

    @staticmethod
    def truncate(prompts: list, k: int | None):
        """Each prompt's last k token ids (truncate_prompt_tokens), before the length checks and the usage count;
        a prompt that was cut loses its text (what is echoed is then its ids' decoding)."""
        if k:
            prompts[:] = [(text if len(ids) <= k else None, ids[-k:]) for text, ids in prompts]

    def check_prompts(self, prompts, param: str):
        for _, ids in prompts:
            try:
                self.llm.engine.check_prompt(ids)
            except ValueError as exc:
                code = "context_length_exceeded" if len(ids) >= self.max_model_len else "invalid_value"
                raise ApiError(400, str(exc), param, code)

    def sampling_params(self, make, names: dict[str, str]):
        """make() checked against the model; ValueError becomes a 400 naming the request's field (names maps
        SamplingParams field names to the request's where they differ)."""
        try:
            params = make()
            self.llm.engine.check_params(params)
        except ValueError as exc:
            field = re.match(r"SamplingParams\.(\w+)", str(exc))
            param = field and names.get(field[1], field[1])
            raise ApiError(400, str(exc).removeprefix("SamplingParams."), param, "invalid_value")
        return params

    def start(self, prompts, params) -> list[tuple[str, asyncio.Queue]]:
        """Queues the prompts' requests if the waiting queue has room for all their sequences (n per prompt):
        (request id, output queue) per prompt."""
        count = len(prompts) * params.n
        if self.max_waiting is not None and count > self.max_waiting:
            param = "prompt" if len(prompts) > 1 else "n"
            raise ApiError(400, f"the request asks for {count} sequences (n x prompts), more than this server "
                           f"queues ({self.max_waiting})", param, "too_many_sequences")
        try:
            started = Started(self.llm.add_requests([{"prompt": t, "prompt_token_ids": ids} for t, ids in prompts],
                                                    params, self.max_waiting))
            started.prompts = prompts if isinstance(prompts, Prompts) else None
            return started
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy ({exc.waiting} sequences waiting); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})
        except ValueError as exc:
            raise ApiError(400, str(exc), "prompt", "invalid_value")

    def stop(self, started):
        """Aborts those of the started requests that have not finished."""
        for rid, _ in started:
            self.llm.abort(rid)

    async def run(self, started) -> AsyncIterator[tuple[int, object]]:
        """Outputs of the started requests as they come, tagged with the prompt's index; leaving early (a
        disconnect) aborts them all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, rid, outputs):
            try:
                async for out in self.llm.stream(rid, outputs):
                    await queue.put((i, out))
            except Exception as exc:
                await queue.put((i, exc))
            await queue.put((i, None))
        tasks = [asyncio.create_task(pump(i, rid, q)) for i, (rid, q) in enumerate(started)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise ApiError(500, f"generation failed: {item}")
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            self.stop(started)

    async def collect(self, prompts, params, timer) -> tuple[dict[int, Choice], int]:
        choices: dict[int, Choice] = {}
        echo = isinstance(prompts, Prompts) and prompts.echo
        async for i, out in self.run(self.start(prompts, params)):
            timer.output(out)
            for c in out.outputs:
                timer.token(len(c.token_ids))
                c = self.dropped(c) if echo and prompts.drop_output else c
                ch = choices.setdefault(i * params.n + c.index, Choice())
                if echo and ch.echo is None:
                    ch.echo = self.echo_of(prompts[i], out)
                ch.text += c.text
                ch.token_ids += c.token_ids
                if c.logprobs is not None:
                    ch.logprobs = (ch.logprobs or []) + c.logprobs
                ch.finish_reason = c.finish_reason
        for ch in choices.values():
            timer.finish(ch.finish_reason)
        return dict(sorted(choices.items())), sum(len(ids) for _, ids in prompts)

    async def stream(self, requests, params, timer) -> AsyncIterator[tuple[int, object, bool | Echo]]:
        """(choice index, delta CompletionOutput, first chunk of this choice?) of the started requests as they
        come; a choice's finish is reported once. With echo, "first" is the choice's Echo instead of True."""
        started, ended = set(), set()
        prompts = getattr(requests, "prompts", None)
        echo = prompts is not None and prompts.echo
        async for i, out in self.run(requests):
            timer.output(out)
            for c in out.outputs:
                index = i * params.n + c.index
                c = self.dropped(c) if echo and prompts.drop_output else c
                if index in ended or not (c.text or c.token_ids or c.finish_reason):
                    continue
                timer.token(len(c.token_ids))
                first = index not in started
                yield index, c, self.echo_of(prompts[i], out) if first and echo else first
                started.add(index)
                if c.finish_reason:
                    ended.add(index)
                    timer.finish(c.finish_reason)

    @staticmethod
    def dropped(c):
        """A delta of a max_tokens 0 echo: its one generated token left out, finished for "length"."""
        return CompletionOutput(c.index, "", [], None, None if c.logprobs is None else [],
                                c.finish_reason and "length")


class Timer:
    """One HTTP request's figures for the metrics: time to first token, time per output token, end-to-end time,
    each engine request's time in the queue, prompt tokens and how each choice finished."""

    def __init__(self, metrics, prompt_tokens: int = 0):
        self.metrics, self.start, self.first, self.tokens = metrics, time.perf_counter(), None, 0
        self.queued: set[str] = set()
        if metrics:
            metrics.prompt_tokens.inc(prompt_tokens)

    def output(self, out):
        """An engine output: its request's time in the queue, once per request."""
        waited = out.metrics.time_in_queue if out.metrics else None
        if self.metrics and waited is not None and out.request_id not in self.queued:
            self.queued.add(out.request_id)
            self.metrics.queue.observe(waited)

    def finish(self, reason: str | None):
        if self.metrics and reason:
            self.metrics.finished.labels(reason).inc()

    def token(self, n: int):
        if n and self.first is None:
            self.first = time.perf_counter()
            if self.metrics:
                self.metrics.ttft.observe(self.first - self.start)
        self.tokens += n

    def done(self):
        if self.metrics:
            self.metrics.e2e.observe(time.perf_counter() - self.start)
        if self.metrics and self.first is not None and self.tokens > 1:
            self.metrics.tpot.observe((time.perf_counter() - self.first) / (self.tokens - 1))
