"""The server through the official openai client against a real server on a loopback port."""
import asyncio
import time

import httpx
import openai
import pytest

from dsinfer import SamplingParams
from dsinfer.server.protocol import ChatCompletionRequest, CompletionRequest


def offline(ref, prompt, **kw):
    sp = SamplingParams(temperature=0, ignore_eos=True, **kw)
    return ref.generate(prompt, sp, use_tqdm=False)[0].outputs[0]


def wait_until_idle(server, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = server.llm.engine.stats()
        if stats.kv_blocks_used == 0 and not server.llm.engine.has_unfinished():
            return stats
        time.sleep(0.05)
    raise AssertionError("blocks still in use")


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-v3"]


def test_completion(client, server, ref):
    r = client.completions.create(model="tiny-v3", prompt="def f(x):", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == offline(ref, "def f(x):", max_tokens=10).text
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens == len(server.llm.get_tokenizer().encode("def f(x):"))


def test_streamed_completion_with_usage(client, ref):
    stream = client.completions.create(model="tiny-v3", prompt="import os", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline(ref, "import os", max_tokens=12).text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"


def test_completion_logprobs_and_stop(client, ref):
    full = offline(ref, "class A:", max_tokens=16).text
    stop = full[4:6]
    r = client.completions.create(model="tiny-v3", prompt="class A:", max_tokens=16, temperature=0, logprobs=2,
                                  stop=[stop], extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text == full[:full.index(stop)] and c.finish_reason == "stop"
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) >= 1
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)


def test_n_samples_and_prompt_lists(client):
    r = client.completions.create(model="tiny-v3", prompt=["a", "b"], n=3, max_tokens=4, seed=5)
    assert sorted(c.index for c in r.choices) == list(range(6))
    ids = client.completions.create(model="tiny-v3", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_chat(client, ref):
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny-v3", messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    prompt = ref.chat_prompt(messages)
    expected = offline(ref, prompt, max_tokens=8).text
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert len(r.choices[0].logprobs.content) == 8 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = client.chat.completions.create(model="tiny-v3", messages=messages, max_completion_tokens=8,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sixteen_concurrent_streams(server, ref):
    prompts = [f"def f{i}(x):" for i in range(16)]

    async def one(client, p):
        stream = await client.completions.create(model="tiny-v3", prompt=p, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(client, p) for p in prompts))
    texts = asyncio.run(run())
    expected = [o.outputs[0].text for o in ref.generate(prompts, SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)]
    assert texts == expected
    wait_until_idle(server)


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": "tiny-v3", "prompt": "def f(x):", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert server.llm.engine.stats().kv_blocks_used > 0
    stats = wait_until_idle(server)
    assert stats.kv_blocks_used == 0


def test_response_cache_serves_repeated_deterministic_requests(client, server):
    body = dict(model="tiny-v3", prompt="while True:", max_tokens=6, temperature=0)
    a = client.completions.create(**body)
    before = metric(server, "dsinfer_response_cache_hits_total")
    b = client.completions.create(**body)
    assert a.choices[0].text == b.choices[0].text and metric(server, "dsinfer_response_cache_hits_total") == before + 1


@pytest.mark.parametrize("fields, cacheable", [
    ({"temperature": 0}, True), ({"temperature": 0, "seed": 3}, True), ({"temperature": 0.7, "seed": 3}, True),
    ({"seed": 0}, True), ({"temperature": 0.7}, False), ({"temperature": 2}, False), ({}, False),
], ids=str)
def test_only_greedy_or_seeded_requests_are_cacheable(fields, cacheable):
    """temperature defaults to 1: without a seed, a sampled answer must not be served twice."""
    assert CompletionRequest(prompt="x", **fields).deterministic is cacheable
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **fields).deterministic is cacheable


def test_response_cache_never_serves_a_sampled_request_without_seed(client, server):
    body = dict(model="tiny-v3", prompt="for i in range(", max_tokens=6)
    for sampled in (dict(body, temperature=0.8), body):  # no temperature: 1.0
        before = metric(server, "dsinfer_response_cache_hits_total")
        client.completions.create(**sampled)
        client.completions.create(**sampled)
        assert metric(server, "dsinfer_response_cache_hits_total") == before, sampled
    seeded = dict(body, temperature=0.8, seed=11)
    a = client.completions.create(**seeded)
    before = metric(server, "dsinfer_response_cache_hits_total")
    b = client.completions.create(**seeded)
    assert a.choices[0].text == b.choices[0].text and metric(server, "dsinfer_response_cache_hits_total") == before + 1


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_exposes_engine_and_latency(client, server):
    client.completions.create(model="tiny-v3", prompt="x = ", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("dsinfer_requests_total{", "dsinfer_time_to_first_token_seconds_bucket",
                 "dsinfer_time_per_output_token_seconds_count", "dsinfer_running_requests", "dsinfer_waiting_requests",
                 "dsinfer_kv_cache_usage", "dsinfer_prefix_cache_hit_rate", "dsinfer_expert_tokens_total{"):
        assert name in text


def test_metrics_count_prompt_tokens_finish_reasons_queue_and_end_to_end_time(make_server):
    server = make_server()  # its own, so that the counts are this test's alone
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    r = client.completions.create(model="tiny-v3", prompt=[[5, 6, 7], [8, 9]], max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    streamed = client.completions.create(model="tiny-v3", prompt=[4, 4, 4, 4], max_tokens=2, stream=True,
                                         extra_body={"ignore_eos": True})
    assert len(list(streamed)) > 0
    assert r.usage.prompt_tokens == 5
    assert metric(server, "dsinfer_prompt_tokens_total") == 5 + 4
    assert metric(server, 'dsinfer_request_success_total{finished_reason="length"}') == 3  # one per choice
    assert metric(server, "dsinfer_e2e_request_latency_seconds_count") == 2  # one per HTTP request
    assert metric(server, "dsinfer_request_queue_time_seconds_count") == 3  # one per engine request


def test_request_outputs_carry_arrival_and_first_scheduled_times(llms):
    out = llms("v3").generate([{"prompt_token_ids": [5, 6, 7]}], use_tqdm=False)[0]
    assert out.metrics.first_scheduled_time >= out.metrics.arrival_time and out.metrics.time_in_queue >= 0


def test_openapi_description(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])


def test_semantic_cache_answers_a_near_duplicate(make_server):
    server = make_server(semantic_cache_threshold=0.95)  # the two parse_args prompts: 0.96 on this model
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    body = dict(model="tiny-v3", max_tokens=6, temperature=0)
    first = client.completions.create(prompt="def parse_args(argv):\n    parser = ", **body)
    near = client.completions.create(prompt="def parse_args(argv):\n    parser  = ", **body)
    other = client.completions.create(prompt="class Stack:\n    def push(self, x):", **body)
    hot = client.completions.create(prompt="def parse_args(argv):\n    parser = ", **dict(body, max_tokens=5))
    assert near.choices[0].text == first.choices[0].text  # served from the semantic cache
    assert metric(server, "dsinfer_semantic_cache_hits_total") == 1
    assert other.choices[0].text != first.choices[0].text and len(hot.choices[0].text) <= len(first.choices[0].text)


def test_logit_bias_and_allowed_token_ids(client, ref):
    target = ref.get_tokenizer().encode(" x", add_special_tokens=False)[-1]
    r = client.completions.create(model="tiny-v3", prompt="def f(x):", max_tokens=6, temperature=0,
                                  logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == offline(ref, "def f(x):", max_tokens=6, logit_bias={target: 100}).text
    assert offline(ref, "def f(x):", max_tokens=6, logit_bias={target: 100}).token_ids == [target] * 6
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny-v3", messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True, "allowed_token_ids": [40, 41]})
    out = offline(ref, ref.chat_prompt(messages), max_tokens=6, allowed_token_ids=[40, 41])
    assert r.choices[0].message.content == out.text and set(out.token_ids) <= {40, 41}
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="tiny-v3", prompt="x", max_tokens=2, logit_bias={"1": 101})
    with pytest.raises(openai.BadRequestError, match="allowed_token_ids"):
        client.completions.create(model="tiny-v3", prompt="x", max_tokens=2, extra_body={"allowed_token_ids": [10**7]})


def test_bad_words(client, ref):
    plain = offline(ref, "class A:", max_tokens=12)
    word = ref.get_tokenizer().decode(plain.token_ids[1:3]).strip()
    expected = offline(ref, "class A:", max_tokens=12, bad_words=[word])
    r = client.completions.create(model="tiny-v3", prompt="class A:", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True, "bad_words": [word]})
    assert r.choices[0].text == expected.text and expected.token_ids != plain.token_ids


def test_include_stop_str_in_output(client, ref):
    full = offline(ref, "class A:", max_tokens=16).text
    stop = full[4:6]
    r = client.completions.create(model="tiny-v3", prompt="class A:", max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert r.choices[0].text == full[:full.index(stop) + len(stop)] and r.choices[0].finish_reason == "stop"


def test_truncate_prompt_tokens(client, ref):
    prompt = list(range(5, 25))
    r = client.completions.create(model="tiny-v3", prompt=prompt, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True, "truncate_prompt_tokens": 4})
    assert r.choices[0].text == offline(ref, {"prompt_token_ids": prompt[-4:]}, max_tokens=5).text
    assert r.usage.prompt_tokens == 4
    long = list(range(5, 305))  # longer than the server's 256-token context: truncated before the length check
    r = client.completions.create(model="tiny-v3", prompt=long, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True, "truncate_prompt_tokens": 100})
    assert r.usage.prompt_tokens == 100
    assert r.choices[0].text == offline(ref, {"prompt_token_ids": long[-100:]}, max_tokens=5).text


@pytest.mark.parametrize("field,value", [("functions", [{"name": "f"}]), ("guided_json", {"type": "object"})])
def test_fields_that_change_the_output_and_are_not_implemented_are_refused(server, field, value):
    body = {"model": "tiny-v3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    harmless = {"model": "tiny-v3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "response_format": {"type": "text"}, "tool_choice": "none"}
    assert httpx.post(server.url + "/v1/chat/completions", json=harmless).status_code == 200
