"""Admission: every value the schema accepts but the model cannot take is a 400 naming its field (never a 500,
never a failure of other requests), the waiting queue's limit counts sequences, and the guards in front hold
for odd headers and chunked bodies."""
import json
import threading

import httpx
import pytest


@pytest.fixture(scope="module")
def server(make_server):
    return make_server(max_tokens_cap=200)


def post(server, body, path="/v1/completions", headers=None):
    return httpx.post(server.url + path, content=json.dumps(body),
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60)


BAD = [
    ({"stop_token_ids": [4096], "min_tokens": 1, "max_tokens": 4}, "stop_token_ids"),
    ({"stop_token_ids": [10**9], "min_tokens": 1, "max_tokens": 4}, "stop_token_ids"),
    ({"stop_token_ids": [2**63], "min_tokens": 1, "max_tokens": 4}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop": ""}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"min_tokens": 10, "max_tokens": 4}, "min_tokens"),
    ({"seed": 2**64}, "seed"),
    ({"prompt": "a\ud800b"}, "prompt"),
]


@pytest.mark.parametrize("fields,param", BAD)
def test_values_the_model_cannot_take_get_a_400_naming_the_field(fields, param, server):
    r = post(server, {"model": "tiny-v3", "prompt": "hi", **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_chat_names_its_own_fields(server):
    body = {"model": "tiny-v3", "messages": [{"role": "user", "content": "hi"}]}
    r = post(server, {**body, "min_tokens": 10, "max_completion_tokens": 4}, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    bad_text = {"model": "tiny-v3", "messages": [{"role": "user", "content": "a\ud800b"}]}
    r = post(server, bad_text, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_a_bad_request_does_not_fail_the_ones_in_flight(server):
    long = {"model": "tiny-v3", "prompt": "def f(x):", "max_tokens": 150, "ignore_eos": True}
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=post(server, long)))
    thread.start()
    bad = post(server, {"model": "tiny-v3", "prompt": "hi", "stop_token_ids": [4096], "min_tokens": 1,
                        "max_tokens": 4})
    thread.join()
    assert bad.status_code == 400
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 150


@pytest.fixture(scope="module")
def small_queue(make_server):
    return make_server(llm_kw={"max_num_seqs": 1}, max_waiting=4)


def test_the_queue_limit_counts_sequences(small_queue):
    body = {"model": "tiny-v3", "prompt": "hi", "max_tokens": 2}
    r = post(small_queue, {**body, "n": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = post(small_queue, {**body, "prompt": ["hi"] * 300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert post(small_queue, {**body, "n": 4}).status_code == 200


def test_concurrent_requests_cannot_all_pass_the_queue_limit(small_queue):
    sched = small_queue.llm.engine.scheduler
    add, peak = sched.add, [0]

    def counting_add(seq):
        add(seq)
        peak[0] = max(peak[0], len(sched.waiting))
    sched.add = counting_add
    body = {"model": "tiny-v3", "prompt": "def f(x):", "max_tokens": 150, "ignore_eos": True}
    results, start = [], threading.Barrier(32)

    def send():
        start.wait()
        results.append(post(small_queue, body))
    threads = [threading.Thread(target=send) for _ in range(32)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del sched.add
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429} and 429 in codes
    assert peak[0] <= 4


def test_non_ascii_api_keys(make_server):
    server = make_server(api_key="clé-ключ")
    body = {"model": "tiny-v3", "prompt": "a", "max_tokens": 2}
    assert post(server, body, headers={"Authorization": b"Bearer \xff"}).status_code == 401
    assert post(server, body, headers={"Authorization": b"Bearer nope"}).status_code == 401
    ok = post(server, body, headers={"Authorization": "Bearer clé-ключ".encode()})
    assert ok.status_code == 200, ok.text


def test_a_chunked_body_over_the_cap_gets_413(make_server):
    server = make_server(max_body_bytes=1000)

    def chunks():
        yield b'{"model": "tiny-v3", "prompt": "'
        for _ in range(100):
            yield b"a" * 100
        yield b'"}'
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("the request body is over")
    small = httpx.post(server.url + "/v1/completions", content=iter([b'{"prompt": "a",', b' "max_tokens": 2}']),
                       headers={"content-type": "application/json"})
    assert small.status_code == 200, small.text


def test_metrics_count_unhandled_errors(server):
    handler = server.server.config.app.state.server.handler

    def broken(name):
        raise RuntimeError("a bug")
    handler.check_model = broken
    try:
        r = post(server, {"model": "tiny-v3", "prompt": "a"})
    finally:
        del handler.check_model
    assert r.status_code == 500
    metrics = httpx.get(server.url + "/metrics").text
    assert 'dsinfer_requests_total{route="/v1/completions",status="500"} 1.0' in metrics
