"""/v1/ws: the request bodies of the HTTP routes over one socket, answered with the same chunks as JSON
messages and then "[DONE]" (errors too); {"type": "cancel"} stops the request in flight. A message the socket
cannot take (binary, over the body-size cap, an unknown endpoint) gets an error and "[DONE]", then a close."""
import asyncio
import json

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from dsinfer.server import errors
from dsinfer.server.errors import ApiError
from dsinfer.server.protocol import ChatCompletionRequest, CompletionRequest

ENDPOINTS = {"chat": ChatCompletionRequest, "completions": CompletionRequest}
UNSUPPORTED_DATA, POLICY_VIOLATION, TOO_BIG = 1003, 1008, 1009


class Refused(Exception):
    """A message that ends the socket: the client gets the error, then a close with close_code."""

    def __init__(self, status: int, message: str, close_code: int):
        super().__init__(message)
        self.status, self.message, self.close_code = status, message, close_code


class WebSocketRoute:
    def __init__(self, server):
        self.server = server
        self.max_bytes = server.cfg.max_body_bytes

    async def __call__(self, websocket: WebSocket):
        await websocket.accept()
        try:
            while True:
                await self.request(websocket, await self.receive(websocket))
        except WebSocketDisconnect:
            return
        except Refused as exc:
            await self.refuse(websocket, exc)

    async def receive(self, ws: WebSocket) -> str:
        """The next message's text; Refused for a binary or oversized one."""
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        text = message.get("text")
        if text is None:
            raise Refused(400, "only text messages (JSON request bodies) are accepted", UNSUPPORTED_DATA)
        if len(text.encode("utf-8", "surrogatepass")) > self.max_bytes:
            raise Refused(413, f"the message is over {self.max_bytes} bytes", TOO_BIG)
        return text

    @staticmethod
    async def refuse(ws: WebSocket, exc: Refused):
        await ws.send_json(errors.error_body(exc.status, exc.message))
        await ws.send_text("[DONE]")
        await ws.close(exc.close_code)

    @staticmethod
    def parse(text: str):
        body = json.loads(text)
        if not isinstance(body, dict):
            raise ValueError("a request must be a JSON object")
        endpoint = body.pop("endpoint", "chat" if "messages" in body else "completions")
        if endpoint not in ENDPOINTS:
            raise Refused(400, f"unknown endpoint {endpoint!r}: use one of {sorted(ENDPOINTS)}", POLICY_VIOLATION)
        return endpoint, ENDPOINTS[endpoint].model_validate(body)

    async def request(self, ws: WebSocket, text: str):
        try:
            endpoint, req = self.parse(text)
            self.server.admit()
            prompts, params = self.server.prepare(endpoint, req)
            started = self.server.handler.start(prompts, params)
        except (ValueError, ValidationError, ApiError) as exc:
            await ws.send_json(error_message(exc))
            return await ws.send_text("[DONE]")
        try:
            await self.answer(ws, self.server.chunks(endpoint, req, prompts, params, started))
        finally:
            self.server.handler.stop(started)

    async def answer(self, ws: WebSocket, chunks):
        task = asyncio.create_task(self.pump(ws, chunks))
        listener = asyncio.create_task(self.receive(ws))
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if listener in done:
            await self.interrupted(ws, task, listener)
        else:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            if isinstance(task.exception(), ApiError):
                await ws.send_json(error_message(task.exception()))
        await ws.send_text("[DONE]")

    async def interrupted(self, ws: WebSocket, task, listener):
        """A message arrived mid-stream: a cancel, anything else (refused), or the client leaving."""
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if listener.exception() is not None:
            raise listener.exception()
        if is_cancel(listener.result()):
            return await ws.send_json({"object": "cancelled"})
        await ws.send_json(error_message(ValueError(
            'one request at a time on a socket; the current one was stopped (send {"type": "cancel"} to stop it)')))

    @staticmethod
    async def pump(ws: WebSocket, chunks):
        async for chunk in chunks:
            await ws.send_json(chunk)


def is_cancel(text: str) -> bool:
    try:
        message = json.loads(text)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("type") == "cancel"


def error_message(exc: Exception) -> dict:
    if isinstance(exc, ApiError):
        return errors.error_body(exc.status, exc.message, exc.param, exc.code)
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ()))
        return errors.error_body(400, f"{param}: {err.get('msg')}", param or None, "invalid_value")
    return errors.error_body(400, str(exc))
