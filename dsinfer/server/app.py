"""The FastAPI application: OpenAI routes, a WebSocket stream, health and Prometheus metrics, with API-key,
body-size and queue-length guards in front."""
import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from dsinfer.server import errors, formats
from dsinfer.server import responses as R
from dsinfer.server.cache import ResponseCache
from dsinfer.server.errors import ApiError
from dsinfer.server.guards import Guards
from dsinfer.server.handlers import Handler, Timer
from dsinfer.server.metrics import Metrics
from dsinfer.server.protocol import ChatCompletionRequest, CompletionRequest

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


def build_app(async_llm, cfg: ServerConfig) -> FastAPI:
    cache = ResponseCache(cfg.response_cache_size)
    semantic = None
    if cfg.semantic_cache_threshold is not None:
        from dsinfer.server.semantic_cache import SemanticCache
        semantic = SemanticCache(async_llm.llm.model.config.hidden_size, cfg.semantic_cache_threshold)
    metrics = Metrics(async_llm, cache, semantic)
    handler = Handler(async_llm, cfg.model_name, cfg.max_tokens_cap, metrics)

    @asynccontextmanager
    async def lifespan(app):
        yield
        async_llm.shutdown()

    app = FastAPI(title="dsinfer", description="OpenAI-compatible API for DeepSeek-architecture models",
                  lifespan=lifespan)
    errors.install(app)
    app.add_middleware(Guards, api_key=cfg.api_key, max_body=cfg.max_body_bytes, metrics=metrics)
    app.state.handler, app.state.cache, app.state.cfg = handler, cache, cfg

    def admit():
        waiting = len(async_llm.engine.scheduler.waiting)
        if waiting >= cfg.max_waiting:
            raise ApiError(429, f"the server is busy ({waiting} sequences waiting); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})

    def warn_unknown(body):
        if body.unknown_fields():
            log.warning("ignoring unknown request fields: %s", ", ".join(body.unknown_fields()))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "dsinfer", "max_model_len": handler.max_model_len}]}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=metrics.content_type)

    async def completion_work(req: CompletionRequest):
        handler.check_model(req.model)
        warn_unknown(req)
        prompts = handler.completion_prompts(req)
        handler.check_prompts(prompts)
        max_tokens = handler.max_tokens(req.requested_max_tokens(), [ids for _, ids in prompts], "max_tokens")
        return prompts, req.sampling_params(max_tokens, req.logprobs)

    async def chat_work(req: ChatCompletionRequest):
        handler.check_model(req.model)
        warn_unknown(req)
        prompts = [handler.chat_prompt(req)]
        handler.check_prompts(prompts)
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = handler.max_tokens(req.requested_max_tokens(), [prompts[0][1]], param)
        top = req.top_logprobs or 0
        return prompts, req.sampling_params(max_tokens, top if req.logprobs else None)

    async def answer(endpoint: str, req, prompts, params):
        key = cache.key(endpoint, req) if req.deterministic else None
        if key and (hit := cache.get(key)):
            return {**hit, "id": R.new_id("cmpl" if endpoint == "completions" else "chatcmpl")}
        near = semantic_lookup(endpoint, req, prompts) if key and semantic and len(prompts) == 1 else None
        if near and near[0]:
            return {**near[0], "id": R.new_id("cmpl" if endpoint == "completions" else "chatcmpl")}
        timer = Timer(metrics)
        choices, prompt_tokens = await handler.collect(prompts, params, timer)
        timer.done()
        if endpoint == "completions":
            body = formats.completion_answer(handler, R.new_id("cmpl"), choices, prompt_tokens)
        else:
            body = formats.chat_answer(handler, R.new_id("chatcmpl"), choices, prompt_tokens, req.top_logprobs or 0)
        if key:
            cache.put(key, body)
        if near:
            semantic.put(near[1], near[2], body)
        return body

    def semantic_lookup(endpoint, req, prompts):
        """(cached answer or None, embedding, key of the non-prompt fields)."""
        vector = async_llm.embed(prompts[0][1]).numpy()
        fields = cache.key(endpoint, req.model_copy(update={"prompt": "", "messages": []}
                                                    if endpoint == "chat" else {"prompt": ""}))
        return semantic.get(vector, fields), vector, fields

    def chunks(endpoint: str, req, prompts, params):
        timer = Timer(metrics)
        deltas = handler.stream(prompts, params, timer)
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        if endpoint == "completions":
            return formats.completion_chunks(handler, R.new_id("cmpl"), deltas, prompt_tokens, req.include_usage,
                                             timer)
        return formats.chat_chunks(handler, R.new_id("chatcmpl"), deltas, prompt_tokens, req.include_usage,
                                   req.top_logprobs or 0, timer)

    async def sse(gen):
        try:
            async for chunk in gen:
                yield f"data: {json.dumps(chunk)}\n\n"
        except ApiError as exc:
            yield f"data: {json.dumps(errors.error_body(exc.status, exc.message, exc.param, exc.code))}\n\n"
        yield "data: [DONE]\n\n"

    async def serve(endpoint, req, work):
        admit()
        prompts, params = await work(req)
        if req.stream:
            return StreamingResponse(sse(chunks(endpoint, req, prompts, params)), media_type="text/event-stream")
        return JSONResponse(await answer(endpoint, req, prompts, params))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await serve("completions", req, completion_work)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return await serve("chat", req, chat_work)

    @app.websocket("/v1/ws")
    async def websocket(ws: WebSocket):
        await ws.accept()
        try:
            while True:
                await ws_request(ws, await ws.receive_text())
        except WebSocketDisconnect:
            return

    async def ws_request(ws: WebSocket, text: str):
        """One request on the socket: its chunks, then [DONE]. {"type": "cancel"} stops it mid-way."""
        try:
            body = json.loads(text)
            endpoint = body.pop("endpoint", "chat" if "messages" in body else "completions")
            model, work = ((ChatCompletionRequest, chat_work) if endpoint == "chat"
                           else (CompletionRequest, completion_work))
            req = model.model_validate(body)
            admit()
            prompts, params = await work(req)
        except (ValueError, ValidationError, ApiError) as exc:
            await ws.send_json(ws_error(exc))
            return
        task = asyncio.create_task(ws_pump(ws, chunks(endpoint, req, prompts, params)))
        listener = asyncio.create_task(ws.receive_text())
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if listener in done:
            task.cancel()
            message = listener.result() if not listener.exception() else None
            await asyncio.gather(task, return_exceptions=True)
            if message is None:
                raise WebSocketDisconnect()
            await ws.send_json({"object": "cancelled"} if "cancel" in message else ws_error(ValueError(
                "one request at a time on a socket; send {\"type\": \"cancel\"} to stop the current one")))
        else:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        await ws.send_text("[DONE]")

    async def ws_pump(ws: WebSocket, gen):
        async for chunk in gen:
            await ws.send_json(chunk)

    return app


def ws_error(exc: Exception) -> dict:
    if isinstance(exc, ApiError):
        return errors.error_body(exc.status, exc.message, exc.param, exc.code)
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ()))
        return errors.error_body(400, f"{param}: {err.get('msg')}", param or None, "invalid_value")
    return errors.error_body(400, str(exc))
