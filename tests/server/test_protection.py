"""Bad input, overload, authentication and disconnects: 4xx with OpenAI's error body, never a dead server."""
import asyncio
import json
import threading

import httpx
import pytest
import websockets


@pytest.fixture(scope="module")
def server(make_server):
    return make_server(max_tokens_cap=200)


BAD = [
    ("{not json", 400, None),
    (json.dumps({"model": "tiny-v3", "prompt": "a", "n": 0}), 400, "n"),
    (json.dumps({"model": "tiny-v3", "prompt": "a", "top_p": 1.5}), 400, "top_p"),
    (json.dumps({"model": "tiny-v3", "prompt": "a", "temperature": -1}), 400, "temperature"),
    (json.dumps({"model": "tiny-v3", "prompt": "a", "max_tokens": "many"}), 400, "max_tokens"),
    (json.dumps({"model": "tiny-v3", "prompt": "a", "max_tokens": 250}), 400, "max_tokens"),
    (json.dumps({"model": "tiny-v3", "prompt": "a " * 150, "max_tokens": 150}), 400, "max_tokens"),
    (json.dumps({"model": "tiny-v3", "prompt": "a " * 400}), 400, "prompt"),
    (json.dumps({"model": "tiny-v3", "prompt": [10**9]}), 400, "prompt"),
    (json.dumps({"model": "tiny-v3", "prompt": "a", "max_tokens": 0}), 400, "max_tokens"),  # 0 needs echo
    (json.dumps({"model": "tiny-v3", "prompt": "a", "suffix": "b"}), 400, "suffix"),
    (json.dumps({"model": "tiny-v3"}), 400, "prompt"),
    (json.dumps({"model": "gpt-9", "prompt": "a"}), 404, "model"),
    (json.dumps([1, 2]), 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_malformed_requests_get_their_4xx(body, status, param, server):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param is None or err["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200


def test_chat_without_messages_and_with_bad_role(server):
    for body in ({"model": "tiny-v3", "messages": []}, {"model": "tiny-v3", "messages": [{"role": "x", "content": ""}]}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_unknown_fields_are_ignored_with_a_warning(server, caplog):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny-v3", "prompt": "a", "max_tokens": 2,
                                                         "brand_new_field": 1})
    assert r.status_code == 200 and "brand_new_field" in caplog.text


def test_body_size_is_capped(make_server):
    server = make_server(max_body_bytes=1000)
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny-v3", "prompt": "a" * 2000})
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("the request body is over")


def test_api_key(make_server):
    server = make_server(api_key="sesame")
    body = {"model": "tiny-v3", "prompt": "a", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    wrong = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    ok = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200 and httpx.get(server.url + "/health").status_code == 200


def test_overload_gets_429_with_retry_after(make_server):
    server = make_server(llm_kw={"max_num_seqs": 1}, max_waiting=1)
    # long enough that the first two are still running when the rest arrive (60 tokens took ~60 ms, so all
    # eight could be served one after another and none refused); the barrier makes the eight arrive together
    body = {"model": "tiny-v3", "prompt": "def f(x):", "max_tokens": 200, "ignore_eos": True}
    results, start = [], threading.Barrier(8)

    def post():
        start.wait()
        results.append(httpx.post(server.url + "/v1/completions", json=body, timeout=60))
    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
    busy = next(r for r in results if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"


def ws_url(server):
    return server.url.replace("http", "ws") + "/v1/ws"


def test_websocket_streams_the_same_chunks(server):
    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(json.dumps({"model": "tiny-v3", "prompt": "import os", "max_tokens": 8, "temperature": 0,
                                      "ignore_eos": True}))
            chunks = []
            while (msg := await ws.recv()) != "[DONE]":
                chunks.append(json.loads(msg))
            return chunks
    chunks = asyncio.run(run())
    whole = httpx.post(server.url + "/v1/completions", json={"model": "tiny-v3", "prompt": "import os", "max_tokens": 8,
                                                           "temperature": 0, "ignore_eos": True}).json()
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_websocket_cancel_stops_and_frees(server):
    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(json.dumps({"model": "tiny-v3", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 200, "ignore_eos": True}))
            first = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "cancel"}))
            rest = []
            while (msg := await ws.recv()) != "[DONE]":
                rest.append(json.loads(msg))
            return first, rest
    first, rest = asyncio.run(run())
    assert first["object"] == "chat.completion.chunk" and rest[-1] == {"object": "cancelled"}
    assert server.llm.engine.stats().kv_blocks_used == 0


def test_websocket_bad_request_gets_an_error_and_the_socket_stays_open(server):
    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(json.dumps({"model": "tiny-v3", "prompt": "a", "top_p": 3}))
            err = json.loads(await ws.recv())
            assert await ws.recv() == "[DONE]"
            await ws.send(json.dumps({"model": "tiny-v3", "prompt": "a", "max_tokens": 2}))
            msgs = []
            while (msg := await ws.recv()) != "[DONE]":
                msgs.append(msg)
            return err, msgs
    err, msgs = asyncio.run(run())
    assert err["error"]["param"] == "top_p" and msgs


def test_chat_longer_than_the_context_names_messages(server):
    body = {"model": "tiny-v3", "messages": [{"role": "user", "content": "a " * 400}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert r.json()["error"]["code"] == "context_length_exceeded"
