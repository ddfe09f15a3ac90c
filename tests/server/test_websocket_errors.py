"""/v1/ws on messages it cannot take: an error, "[DONE]" and a proper close rather than a dropped connection;
only a JSON cancel message cancels."""
import asyncio
import json

import pytest
import websockets


@pytest.fixture(scope="module")
def server(make_server):
    return make_server(max_tokens_cap=200, max_body_bytes=1000)


def ws_url(server):
    return server.url.replace("http", "ws") + "/v1/ws"


def refused(server, message):
    """The replies to message, then the close code."""
    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(message)
            replies = []
            try:
                while True:
                    replies.append(await asyncio.wait_for(ws.recv(), 10))
            except websockets.ConnectionClosed as closed:
                return replies, closed.rcvd.code if closed.rcvd else None
            except TimeoutError:  # the socket stayed open
                return replies, None
    return asyncio.run(run())


@pytest.mark.parametrize("message,status,code", [
    (b"\x00\x01binary", 400, 1003),
    (json.dumps({"endpoint": "embeddings", "prompt": "a"}), 400, 1008),
    (json.dumps({"prompt": "a" * 2000}), 413, 1009),
])
def test_messages_it_cannot_take_get_an_error_then_a_close(server, message, status, code):
    replies, close_code = refused(server, message)
    assert len(replies) == 2 and replies[1] == "[DONE]"
    err = json.loads(replies[0])["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and close_code == code


def stream_then_send(server, interruption):
    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(json.dumps({"model": "tiny-v3", "prompt": "def f(x):", "max_tokens": 150,
                                      "ignore_eos": True}))
            await ws.recv()
            await ws.send(interruption)
            rest = []
            while (msg := await ws.recv()) != "[DONE]":
                rest.append(json.loads(msg))
            return rest
    return asyncio.run(run())


def test_only_a_json_cancel_message_cancels(server):
    assert stream_then_send(server, json.dumps({"type": "cancel"}))[-1] == {"object": "cancelled"}
    rest = stream_then_send(server, "please cancel")
    assert rest[-1] != {"object": "cancelled"} and "one request at a time" in rest[-1]["error"]["message"]
    assert server.llm.engine.stats().kv_blocks_used == 0
