"""Structured outputs through the server: response_format (json_object, json_schema) and vLLM's
structured_outputs, streamed and not, validated with jsonschema; invalid constraints are a 400 naming the field."""
import json
import re

import httpx
import jsonschema
import pytest

from tests.engine.test_structured_outputs import PERSON

MESSAGES = [{"role": "user", "content": "Describe a user."}]


def test_response_format_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model="tiny-v3", messages=MESSAGES, max_tokens=120, temperature=0.8, seed=3,
                                       n=2, response_format=fmt)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_response_format_json_object_streamed(client):
    stream = client.chat.completions.create(model="tiny-v3", messages=MESSAGES, max_tokens=120, temperature=0,
                                            stream=True, response_format={"type": "json_object"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_structured_outputs_field_on_both_endpoints(client):
    r = client.completions.create(model="tiny-v3", prompt="x", max_tokens=30, temperature=0.7, seed=1, n=3,
                                  extra_body={"structured_outputs": {"regex": r"(ab|cd){1,4}!"}})
    assert all(re.fullmatch(r"(ab|cd){1,4}!", c.text) for c in r.choices)
    r = client.chat.completions.create(model="tiny-v3", messages=MESSAGES, max_tokens=10, temperature=0.7, seed=2,
                                       extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert r.choices[0].message.content in ("red", "green")


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{oops"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"jsonn": {}}}, "structured_outputs.jsonn"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
])
def test_invalid_constraints_are_400_naming_the_field(server, extra, param):
    body = {"model": "tiny-v3", "messages": MESSAGES, "max_tokens": 4, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
