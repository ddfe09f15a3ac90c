"""The FastAPI application: OpenAI routes, a WebSocket stream, health and Prometheus metrics, with API-key,
body-size and queue-length guards in front."""
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

import dsinfer

from dsinfer.server import errors, formats
from dsinfer.server import responses as R
from dsinfer.server.cache import ResponseCache
from dsinfer.server.chat_output import ChatShape, tool_params
from dsinfer.server.errors import ApiError
from dsinfer.server.guards import Guards
from dsinfer.server.handlers import Handler, Timer
from dsinfer.server.metrics import Metrics
from dsinfer.server.protocol import ChatCompletionRequest, CompletionRequest
from dsinfer.server.schemas import (ERRORS, SSE, ChatCompletionResponse, CompletionResponse, Health, ModelList,
                                    contract_openapi)
from dsinfer.server.utility_routes import utility_router
from dsinfer.server.websocket import WebSocketRoute

log = logging.getLogger("dsinfer.server")


@dataclass(slots=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_waiting: int = 256          # queued sequences past which new requests get 429
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 4096
    response_cache_size: int = 512  # 0 turns the response cache off
    semantic_cache_threshold: float | None = None  # cosine similarity for a semantic hit; None: off


class OpenAIServer:
    def __init__(self, async_llm, cfg: ServerConfig):
        self.llm, self.cfg = async_llm, cfg
        self.cache = ResponseCache(cfg.response_cache_size)
        self.semantic = None
        if cfg.semantic_cache_threshold is not None:
            from dsinfer.server.semantic_cache import SemanticCache
            self.semantic = SemanticCache(async_llm.llm.model.config.hidden_size, cfg.semantic_cache_threshold)
        self.metrics = Metrics(async_llm, self.cache, self.semantic)
        self.handler = Handler(async_llm, cfg.model_name, cfg.max_tokens_cap, self.metrics, cfg.max_waiting)
        self.reasoning_parser = async_llm.llm.config.reasoning_parser  # the engine's: it also gates the grammars

    async def health(self):
        return {"status": "ok"}

    async def models(self):
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "dsinfer", "max_model_len": self.handler.max_model_len}]}

    async def metrics_text(self):
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def completions(self, req: CompletionRequest):
        return await self.serve("completions", req)

    async def chat_completions(self, req: ChatCompletionRequest):
        return await self.serve("chat", req)

    def admit(self):
        waiting = len(self.llm.engine.scheduler.waiting)
        if waiting >= self.cfg.max_waiting:
            raise ApiError(429, f"the server is busy ({waiting} sequences waiting); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})

    def prepare(self, endpoint: str, req):
        """Checks the request against the model and the limits; returns (prompts, SamplingParams)."""
        h = self.handler
        h.check_model(req.model)
        for name, instead in req.unsupported_fields():
            raise ApiError(400, f"{name} is not supported by this server ({instead})", name, "unsupported")
        if req.unknown_fields():
            log.warning("ignoring unknown request fields: %s", ", ".join(req.unknown_fields()))
        if endpoint == "completions":
            prompts = h.completion_prompts(req)
            param, prompt_param, logprobs = "max_tokens", "prompt", req.logprobs
        else:
            prompts = [h.chat_prompt(req)]
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            prompt_param, logprobs = "messages", (req.top_logprobs or 0) if req.logprobs else None
        h.truncate(prompts, req.truncate_prompt_tokens)
        h.check_prompts(prompts, prompt_param)
        max_tokens = h.max_tokens(req.requested_max_tokens(), [ids for _, ids in prompts], param, prompt_param)
        names = {"max_tokens": param, "logprobs": "logprobs" if endpoint == "completions" else "top_logprobs",
                 "structured_outputs": req.constraint_field}
        if endpoint == "completions":
            return prompts, h.sampling_params(lambda: req.sampling_params(max_tokens, logprobs), names)
        make = lambda: tool_params(req, req.sampling_params(max_tokens, logprobs), h.tokenizer)  # noqa: E731
        return prompts, h.sampling_params(make, names)

    def chat_shape(self, req: ChatCompletionRequest) -> ChatShape:
        mode = req.tool_mode
        return ChatShape(self.reasoning_parser is not None, mode != "none", mode == "named")

    async def serve(self, endpoint: str, req):
        self.admit()
        prompts, params = self.prepare(endpoint, req)
        if req.stream:
            started = self.handler.start(prompts, params)
            return ClosingStream(self.sse(self.chunks(endpoint, req, prompts, params, started)),
                                 on_close=lambda: self.handler.stop(started), media_type="text/event-stream")
        return JSONResponse(await self.answer(endpoint, req, prompts, params))

    async def answer(self, endpoint: str, req, prompts, params) -> dict:
        """A whole answer, from the response cache when the request is deterministic and was seen before."""
        prefix = "cmpl" if endpoint == "completions" else "chatcmpl"
        key = self.cache.key(endpoint, req) if req.deterministic else None
        if key and (hit := self.cache.get(key)):
            return {**hit, "id": R.new_id(prefix)}
        echoes = getattr(req, "echo", False)  # an echoed answer holds its own prompt: never a near neighbour's
        near = (self.semantic_lookup(endpoint, req, prompts)
                if key and self.semantic and len(prompts) == 1 and not echoes else None)
        if near and near[0]:
            return {**near[0], "id": R.new_id(prefix)}
        timer = Timer(self.metrics, sum(len(ids) for _, ids in prompts))
        choices, prompt_tokens = await self.handler.collect(prompts, params, timer)
        timer.done()
        if endpoint == "completions":
            body = formats.completion_answer(self.handler, R.new_id(prefix), choices, prompt_tokens)
        else:
            body = formats.chat_answer(self.handler, R.new_id(prefix), choices, prompt_tokens, req.top_logprobs or 0,
                                       self.chat_shape(req))
        if key:
            self.cache.put(key, body)
        if near:
            self.semantic.put(near[1], near[2], body)
        return body

    def semantic_lookup(self, endpoint: str, req, prompts):
        """(cached answer or None, the prompt's embedding, the key of the request's other fields)."""
        vector = self.llm.embed(prompts[0][1]).numpy()
        blank = {"prompt": "", "messages": []} if endpoint == "chat" else {"prompt": ""}
        fields = self.cache.key(endpoint, req.model_copy(update=blank))
        return self.semantic.get(vector, fields), vector, fields

    def chunks(self, endpoint: str, req, prompts, params, started):
        """The started requests' stream chunks as dicts (the SSE and WebSocket routes both send these)."""
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        timer = Timer(self.metrics, prompt_tokens)
        deltas = self.handler.stream(started, params, timer)
        if endpoint == "completions":
            return formats.completion_chunks(self.handler, R.new_id("cmpl"), deltas, prompt_tokens,
                                             req.include_usage, timer)
        return formats.chat_chunks(self.handler, R.new_id("chatcmpl"), deltas, prompt_tokens, req.include_usage,
                                   req.top_logprobs or 0, timer, self.chat_shape(req))

    @staticmethod
    async def sse(gen):
        try:
            async for chunk in gen:
                yield f"data: {json.dumps(chunk)}\n\n"
        except ApiError as exc:
            yield f"data: {json.dumps(errors.error_body(exc.status, exc.message, exc.param, exc.code))}\n\n"
        yield "data: [DONE]\n\n"


class ClosingStream(StreamingResponse):
    """A stream that calls on_close when its response ends, however it ends (even a client gone before the
    first chunk, when the body's generator never started and so never ran its own cleanup)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def build_app(async_llm, cfg: ServerConfig) -> FastAPI:
    server = OpenAIServer(async_llm, cfg)

    @asynccontextmanager
    async def lifespan(app):
        yield
        async_llm.shutdown()

    app = FastAPI(title="dsinfer", description="OpenAI-compatible API for DeepSeek-architecture models",
                  version=dsinfer.__version__, lifespan=lifespan)
    errors.install(app)
    app.add_middleware(Guards, api_key=cfg.api_key, max_body=cfg.max_body_bytes, metrics=server.metrics)
    app.get("/health", response_model=Health, responses=ERRORS)(server.health)
    app.get("/v1/models", response_model=ModelList, responses=ERRORS)(server.models)
    app.get("/metrics", response_class=PlainTextResponse, responses=ERRORS,
            description="Prometheus text exposition format")(server.metrics_text)
    generation = {200: {"content": SSE}, **ERRORS}
    app.post("/v1/completions", response_model=CompletionResponse, responses=generation)(server.completions)
    app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=generation)(server.chat_completions)
    app.websocket("/v1/ws")(WebSocketRoute(server))
    app.include_router(utility_router(async_llm, cfg.model_name))
    app.openapi = contract_openapi(app)
    app.state.server = server
    return app
