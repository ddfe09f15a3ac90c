"""Pure ASGI middleware in front of every route: the API key, the request-body size cap, and a count of
responses by route and status for the metrics."""
import hmac
import json

from dsinfer.server.errors import error_body

OPEN_PATHS = {"/health"}


class BodyTooLarge(Exception):
    pass


class Guards:
    def __init__(self, app, api_key: str | None, max_body: int, metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] not in OPEN_PATHS and not self.authorized(scope):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await self.reply(send, 401, "missing or wrong API key: send Authorization: Bearer <key>", scope)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            return await self.reply(send, 413, f"the request body is over {self.max_body} bytes", scope)
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, self.capped(receive), counted_send)
        except BodyTooLarge:
            return await self.reply(send, 413, f"the request body is over {self.max_body} bytes", scope)
        self.metrics.count(scope["path"], status.get("code", 500))

    def authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(header, f"Bearer {self.api_key}")

    def capped(self, receive):
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge()
            return message
        return wrapped

    async def reply(self, send, status: int, message: str, scope):
        body = json.dumps(error_body(status, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.count(scope["path"], status)
