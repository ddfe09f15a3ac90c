"""/v1/ws: the request bodies of the HTTP routes over one socket, answered with the same chunks as JSON
messages and then "[DONE]"; {"type": "cancel"} stops the request in flight."""
import asyncio
import json

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from dsinfer.server import errors
from dsinfer.server.errors import ApiError
from dsinfer.server.protocol import ChatCompletionRequest, CompletionRequest


class WebSocketRoute:
    def __init__(self, server):
        self.server = server

    async def __call__(self, websocket: WebSocket):
        await websocket.accept()
        try:
            while True:
                await self.request(websocket, await websocket.receive_text())
        except WebSocketDisconnect:
            return

    def parse(self, text: str):
        body = json.loads(text)
        if not isinstance(body, dict):
            raise ValueError("a request must be a JSON object")
        endpoint = body.pop("endpoint", "chat" if "messages" in body else "completions")
        model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
        return endpoint, model.model_validate(body)

    async def request(self, ws: WebSocket, text: str):
        try:
            endpoint, req = self.parse(text)
            self.server.admit()
            prompts, params = self.server.prepare(endpoint, req)
            started = self.server.handler.start(prompts, params)
        except (ValueError, ValidationError, ApiError) as exc:
            return await ws.send_json(error_message(exc))
        try:
            await self.answer(ws, self.server.chunks(endpoint, req, prompts, params, started))
        finally:
            self.server.handler.stop(started)

    async def answer(self, ws: WebSocket, chunks):
        task = asyncio.create_task(self.pump(ws, chunks))
        listener = asyncio.create_task(ws.receive_text())
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if listener in done:
            await self.interrupted(ws, task, listener)
        else:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        await ws.send_text("[DONE]")

    async def interrupted(self, ws: WebSocket, task, listener):
        """A message arrived mid-stream: a cancel, anything else (refused), or the client leaving."""
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if listener.exception() is not None:
            raise WebSocketDisconnect()
        if "cancel" in listener.result():
            return await ws.send_json({"object": "cancelled"})
        await ws.send_json(error_message(ValueError(
            'one request at a time on a socket; the current one was stopped (send {"type": "cancel"} to stop it)')))

    @staticmethod
    async def pump(ws: WebSocket, chunks):
        async for chunk in chunks:
            await ws.send_json(chunk)


def error_message(exc: Exception) -> dict:
    if isinstance(exc, ApiError):
        return errors.error_body(exc.status, exc.message, exc.param, exc.code)
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ()))
        return errors.error_body(400, f"{param}: {err.get('msg')}", param or None, "invalid_value")
    return errors.error_body(400, str(exc))
