"""Tool calls (DeepSeek-V3's format, through the chat template, parsed into OpenAI tool_calls, whole and
streamed) and `--reasoning-parser deepseek_r1`, through the openai client against a real server. The checkpoint
is the tiny v3 one with a tokenizer that has DeepSeek's tool-call tokens (its <think> tags are spelled in
pieces: llguidance takes every added token for a special one, which a regex's text cannot match)."""
import json
import shutil

import httpx
import jsonschema
import openai
import pytest

from dsinfer.server.reasoning import ReasoningStream, split_reasoning
from dsinfer.server.tool_calls import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, ToolCallStream,
                                       parse_tool_calls, tool_grammar)
from tests.engine.scripted import Script
from tests.engine.test_reasoning_structured import AFTER, THOUGHT, script_tokens
from tests.engine.test_structured_outputs import PERSON
from tests.server.conftest import LiveServer

TOOL_TOKENS = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>Tools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% endfor %}\n{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m.get('tool_calls') %}<|assistant|>{{ m['content'] }}<｜tool▁calls▁begin｜>"
    "{% for c in m['tool_calls'] %}<｜tool▁call▁begin｜>function<｜tool▁sep｜>{{ c['function']['name'] }}\n```json\n"
    "{{ c['function']['arguments'] }}\n```<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜><eos>"
    "{% elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "now", "parameters": NO_ARGS}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": NO_ARGS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def write_tool_tokenizer(out):
    """A byte-level BPE of 512 ids with DeepSeek's tool tokens as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<bos>", "<eos>", "<pad>", *TOOL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(shutil.__file__)], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True, "chat_template": TEMPLATE}))


@pytest.fixture(scope="module")
def tool_ckpt(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("tools")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ckpts["v3"] / name, out / name)
    write_tool_tokenizer(out)
    return out


def live(path, **llm_kw):
    from dsinfer import LLM
    from dsinfer.engine.async_engine import AsyncLLM
    from dsinfer.server.app import ServerConfig, build_app
    llm = LLM(path, max_model_len=256, **llm_kw)
    assert llm.get_tokenizer().vocab_size <= 512
    server = LiveServer(build_app(AsyncLLM(llm), ServerConfig("tiny-v3")))
    server.llm = llm
    return server


@pytest.fixture(scope="module")
def tool_server(tool_ckpt):
    server = live(tool_ckpt)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tclient(tool_server):
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def rserver(tool_ckpt):
    server = live(tool_ckpt, reasoning_parser="deepseek_r1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rclient(rserver):
    return openai.OpenAI(base_url=rserver.url + "/v1", api_key="unused", max_retries=0)


def check_calls(calls, names=SCHEMAS):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), names[call.function.name])


def test_tool_choice_required_always_calls_a_tool(tclient):
    r = tclient.chat.completions.create(model="tiny-v3", messages=ASK, tools=TOOLS, tool_choice="required",
                                        max_tokens=150, temperature=0.8, seed=4, n=2, parallel_tool_calls=False)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls)
    r = tclient.chat.completions.create(model="tiny-v3", messages=ASK, tools=TOOLS, tool_choice="required",
                                        max_tokens=60, temperature=0.8, seed=4)
    check_calls(r.choices[0].message.tool_calls)  # parallel calls: as many complete ones as fit


def test_named_tool_choice_streamed(tclient):
    stream = tclient.chat.completions.create(
        model="tiny-v3", messages=ASK, tools=TOOLS, max_tokens=150, temperature=0.8, seed=5, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = [c for c in stream if c.choices]
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather" and calls[0].type == "function"
    assert all(t.index == 0 and t.id is None for t in calls[1:])
    args = "".join(t.function.arguments or "" for t in calls)
    jsonschema.validate(json.loads(args), WEATHER)
    assert chunks[-1].choices[0].finish_reason == "stop"  # as OpenAI answers a named tool_choice


def test_auto_parses_content_then_calls_streamed_and_not(tclient, tool_server):
    """In auto mode the model chooses; a grammar makes this weak one write text and then a call."""
    ids = tool_server.llm.get_tokenizer().convert_tokens_to_ids
    grammar = tool_grammar(TOOLS, "get_time", ids).replace("start: ", 'start: "Let me check. " ', 1)
    kw = dict(model="tiny-v3", messages=ASK, tools=TOOLS, max_tokens=150, temperature=0,
              extra_body={"structured_outputs": {"grammar": grammar}})
    r = tclient.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.content == "Let me check. " and r.choices[0].finish_reason == "tool_calls"
    check_calls(msg.tool_calls, {"get_time": SCHEMAS["get_time"]})
    chunks = [c for c in tclient.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    deltas = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_time"
    assert "".join(t.function.arguments or "" for t in deltas) == msg.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_history_with_calls_and_results_renders(tclient):
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris","days":1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = tclient.chat.completions.create(model="tiny-v3", messages=history, tools=TOOLS, tool_choice="none",
                                        max_tokens=5, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens > 20


@pytest.mark.parametrize("extra,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tool_requests_are_400(tool_server, extra, param):
    body = {"model": "tiny-v3", "messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra}
    r = httpx.post(tool_server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text


def test_reasoning_then_schema_streamed_and_not(rserver, rclient, monkeypatch):
    """With the parser the schema holds after </think> only: the (scripted) reasoning is free text, and the
    content validates although the script goes on with text the schema refuses."""
    Script(monkeypatch, rserver.llm.engine, script_tokens(rserver.llm, THOUGHT, AFTER))
    kw = dict(model="tiny-v3", messages=ASK, max_tokens=160, temperature=0.7, seed=3,
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    msg = rclient.chat.completions.create(**kw).choices[0].message
    assert msg.reasoning_content == THOUGHT
    jsonschema.validate(json.loads(msg.content), PERSON)
    chunks = [c.choices[0].delta for c in rclient.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in chunks) == THOUGHT
    jsonschema.validate(json.loads("".join(d.content or "" for d in chunks)), PERSON)
    r = rclient.chat.completions.create(model="tiny-v3", messages=ASK, tools=TOOLS, max_tokens=150, temperature=0,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.choices[0].message.reasoning_content == THOUGHT
    check_calls(r.choices[0].message.tool_calls, {"get_weather": WEATHER})


def test_reasoning_split_without_a_constraint(rclient):
    free = rclient.chat.completions.create(model="tiny-v3", messages=ASK, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].message
    assert free.content is None and free.reasoning_content  # R1 thinks until </think>: all reasoning


TEXTS = ["<think>abc</think>answer", "plain thoughts", "a</think>", "x</thi", "</think>b<think>c"]


@pytest.mark.parametrize("text", TEXTS)
def test_reasoning_stream_matches_the_whole_split_at_every_cut(text):
    for cut in range(len(text) + 1):
        stream = ReasoningStream()
        parts = [stream.feed(text[:cut]), stream.feed(text[cut:]), stream.feed("", final=True)]
        reasoning, content = split_reasoning(text)
        assert "".join(p[0] for p in parts) == (reasoning or "")
        assert "".join(p[1] for p in parts) == (content or "")


def test_tool_call_stream_matches_the_whole_parse_at_every_cut():
    text = (f"Sure.{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{\"city\": \"Oslo\"}}\n```{CALL_END}"
            f"\n{CALL_BEGIN}function{SEP}get_time\n```json\n{{}}\n```{CALL_END}{CALLS_END}")
    content, calls = parse_tool_calls(text)
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    for cut in range(0, len(text) + 1, 3):
        stream = ToolCallStream()
        deltas = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.feed("", final=True)
        assert "".join(d.get("content", "") for d in deltas) == content
        got = {}
        for d in deltas:
            for t in d.get("tool_calls", []):
                got.setdefault(t["index"], {"name": t.get("function", {}).get("name"), "args": ""})
                got[t["index"]]["args"] += t["function"].get("arguments", "")
        assert [(g["name"], g["args"]) for g in got.values()] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in calls]
