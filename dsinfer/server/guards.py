"""Pure ASGI middleware in front of every route: the API key, the request-body size cap, and a count of
responses by route and status for the metrics."""
import hmac
import json

from dsinfer.server.errors import error_body

OPEN_PATHS = {"/health"}


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
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
        try:
            body = await self.read_body(receive)
        except BodyTooLarge:
            return await self.reply(send, 413, f"the request body is over {self.max_body} bytes", scope)
        except ClientGone:
            return
        await self.counted(scope, self.replay(body, receive), send)

    async def counted(self, scope, receive, send):
        """Runs the app, counting its response's status for the metrics (an unhandled error counts as 500)."""
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.count(scope["path"], status.get("code", 500))

    def authorized(self, scope) -> bool:
        """The Authorization header against the key, as bytes (a key or header that is not ASCII is compared
        as its UTF-8 bytes)."""
        header = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(header, b"Bearer " + self.api_key.encode("utf-8"))

    async def read_body(self, receive) -> bytes:
        """The whole request body, read up to the cap (a chunked body has no Content-Length to check first)."""
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                raise ClientGone()
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body:
                raise BodyTooLarge()
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    def replay(body: bytes, receive):
        """A receive that gives the app the body already read, then waits on the client (for a disconnect)."""
        sent = False

        async def wrapped():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return wrapped

    async def reply(self, send, status: int, message: str, scope):
        body = json.dumps(error_body(status, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.count(scope["path"], status)
