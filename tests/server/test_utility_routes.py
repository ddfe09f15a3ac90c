"""/tokenize, /detokenize, /v1/models/{id}, /version and /v1/embeddings against a real server on a loopback port
(the official openai client for embeddings and models.retrieve, httpx for the rest)."""
import base64
import struct

import httpx
import openai
import pytest
import torch

import dsinfer
from dsinfer.engine.model_runner import embed
from tests.server.conftest import LiveServer

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(server):
    return server.llm.get_tokenizer()


@pytest.fixture(scope="module")
def bare_server(ckpts):
    """A server over a checkpoint without a tokenizer."""
    from dsinfer import LLM
    from dsinfer.engine.async_engine import AsyncLLM
    from dsinfer.server.app import ServerConfig, build_app
    llm = LLM(ckpts["v2"], max_model_len=128)
    assert llm.get_tokenizer() is None
    server = LiveServer(build_app(AsyncLLM(llm), ServerConfig("tiny-v2")))
    yield server
    server.stop()


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=30, **kw)


def assert_error(r, status, param):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    return err["message"]


def test_tokenize_a_prompt(server, tok):
    r = post(server, "/tokenize", {"model": "tiny-v3", "prompt": "def f(x):"})
    assert r.status_code == 200, r.text
    ids = tok.encode("def f(x):")
    assert r.json() == {"count": len(ids), "max_model_len": 256, "tokens": ids}
    plain = post(server, "/tokenize", {"prompt": "def f(x):", "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode("def f(x):", add_special_tokens=False) == ids[1:]


def test_tokenize_returns_token_strings_when_asked(server, tok):
    body = post(server, "/tokenize", {"prompt": "import json", "return_token_strs": True}).json()
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"]) and body["token_strs"][0] == "<bos>"


def test_tokenize_messages_through_the_chat_template(server, tok):
    body = post(server, "/tokenize", {"messages": CONV, "add_generation_prompt": True}).json()
    text = tok.apply_chat_template(CONV, add_generation_prompt=True)
    assert body["tokens"] == tok.encode(text, add_special_tokens=False) == server.llm.chat_prompt(CONV)[
        "prompt_token_ids"]
    assert body["count"] == len(body["tokens"]) and "token_strs" not in body
    without = post(server, "/tokenize", {"messages": CONV, "add_generation_prompt": False}).json()
    assert without["tokens"] == tok.apply_chat_template(CONV, add_generation_prompt=False, tokenize=True)
    assert without["count"] < body["count"]


def test_tokenize_rejects_bad_bodies(server):
    assert_error(post(server, "/tokenize", {"prompt": "a", "messages": CONV}), 400, "messages")
    assert_error(post(server, "/tokenize", {}), 400, "prompt")
    assert_error(post(server, "/tokenize", {"prompt": 5}), 400, "prompt")
    assert_error(post(server, "/tokenize", {"model": "other", "prompt": "a"}), 404, "model")


def test_detokenize_round_trips(server, tok):
    ids = tok.encode("def quicksort(xs):")
    r = post(server, "/detokenize", {"model": "tiny-v3", "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": tok.decode(ids, skip_special_tokens=False)}
    assert r.json()["prompt"] == "<bos>def quicksort(xs):"


@pytest.mark.parametrize("bad", [[5, 512], [-1], [5, 10**12]])
def test_detokenize_rejects_ids_outside_the_vocabulary(server, bad):
    message = assert_error(post(server, "/detokenize", {"tokens": bad}), 400, "tokens")
    assert str(bad[-1]) in message and "vocabulary" in message


def test_detokenize_rejects_non_integer_ids(server):
    assert_error(post(server, "/detokenize", {"tokens": [1, "2"]}), 400, "tokens.1")
    assert_error(post(server, "/detokenize", {"tokens": [1.5]}), 400, "tokens.0")


def test_no_tokenizer_is_a_400_saying_so(bare_server):
    for path, body, param in (("/tokenize", {"prompt": "a"}, "prompt"), ("/tokenize", {"messages": CONV}, "messages"),
                              ("/detokenize", {"tokens": [1]}, "tokens"),
                              ("/v1/embeddings", {"input": "a"}, "input")):
        assert "no tokenizer" in assert_error(post(bare_server, path, body), 400, param)


def test_embeddings_of_token_ids_without_a_tokenizer(bare_server):
    r = post(bare_server, "/v1/embeddings", {"input": [[5, 6, 7], [8]]})
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["data"]] == [0, 1] and r.json()["usage"]["prompt_tokens"] == 4


def test_models_retrieve(client, server):
    model = client.models.retrieve("tiny-v3")
    assert model.id == "tiny-v3" and model.object == "model" and model.owned_by == "dsinfer"
    listed = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert httpx.get(server.url + "/v1/models/tiny-v3").json() == listed
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    body = httpx.get(server.url + "/v1/models/org/other").json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}


def test_version(server):
    r = httpx.get(server.url + "/version")
    assert r.status_code == 200 and r.json() == {"version": dsinfer.__version__}


def test_embeddings_match_the_model(client, server, tok):
    texts = ["def f(x):", "import json"]
    r = client.embeddings.create(model="tiny-v3", input=texts)  # the client asks for base64 and decodes it
    assert r.object == "list" and r.model == "tiny-v3" and [d.index for d in r.data] == [0, 1]
    ids = [tok.encode(t) for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(i) for i in ids)
    hidden = server.llm.model.config.hidden_size
    for d, prompt in zip(r.data, ids):
        assert d.object == "embedding" and len(d.embedding) == hidden
        want = embed(server.llm.model, prompt)
        torch.testing.assert_close(torch.tensor(d.embedding), want, atol=1e-6, rtol=0)
        assert abs(torch.tensor(d.embedding).norm().item() - 1) < 1e-5


def test_embeddings_float_and_base64_agree(server):
    body = {"input": "def f(x):", "encoding_format": "float"}
    floats = post(server, "/v1/embeddings", body).json()["data"][0]["embedding"]
    packed = post(server, "/v1/embeddings", {**body, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    raw = base64.b64decode(packed)
    assert isinstance(floats, list) and len(raw) == 4 * len(floats)
    assert list(struct.unpack(f"<{len(floats)}f", raw)) == pytest.approx(floats, abs=1e-7)


def test_embeddings_take_token_ids(client, tok):
    ids = tok.encode("def f(x):")
    one = client.embeddings.create(model="tiny-v3", input=ids, encoding_format="float")
    text = client.embeddings.create(model="tiny-v3", input="def f(x):", encoding_format="float")
    many = client.embeddings.create(model="tiny-v3", input=[ids, ids[:3]], encoding_format="float")
    assert len(one.data) == 1 and one.data[0].embedding == pytest.approx(text.data[0].embedding, abs=1e-6)
    assert len(many.data) == 2 and many.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1e-6)
    assert many.usage.prompt_tokens == len(ids) + 3


@pytest.mark.parametrize("body,param", [({"input": []}, "input"), ({"input": [""]}, "input"),
                                        ({"input": [[5, 99999]]}, "input"), ({"input": [-1]}, "input"),
                                        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
                                        ({"input": "a", "dimensions": 3}, "dimensions"),
                                        ({"input": "a " * 300}, "input")])
def test_embeddings_reject_bad_input(server, body, param):
    assert_error(post(server, "/v1/embeddings", body), 400, param)


def test_embeddings_of_another_model_are_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="a")


def test_routes_are_behind_the_api_key(make_server):
    keyed = make_server(api_key="sekrit")
    for method, path, body in (("POST", "/tokenize", {"prompt": "a"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/v1/models/tiny-v3", None), ("GET", "/version", None),
                               ("POST", "/v1/embeddings", {"input": "a"})):
        assert httpx.request(method, keyed.url + path, json=body).status_code == 401
        ok = httpx.request(method, keyed.url + path, json=body, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200, ok.text


def test_routes_are_in_the_openapi_document(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    for path in ("/tokenize", "/detokenize", "/v1/models/{model_id}", "/version", "/v1/embeddings"):
        assert path in doc["paths"], path
    schemas = doc["components"]["schemas"]
    assert {"TokenizeRequest", "TokenizeResponse", "EmbeddingRequest", "EmbeddingResponse", "ModelCard"} <= set(schemas)
