"""echo (with and without logprobs, max_tokens 0) on /v1/completions through the official openai client against a
real server on a loopback port, checked against the offline API's prompt logprobs."""
import httpx
import pytest

from dsinfer import SamplingParams

PROMPT = "The cat sat on"


def prompt_logprobs(ref, prompt, k):
    out = ref.generate(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k), use_tqdm=False)[0]
    return out.prompt_token_ids, out.prompt_logprobs


def echo(client, prompt, **kw):
    args = {"max_tokens": 0, "temperature": 0, "echo": True, "logprobs": 1, **kw}
    return client.completions.create(model="tiny-v3", prompt=prompt, **args).choices[0]


def test_echo_text_is_prompt_plus_completion(client):
    plain = client.completions.create(model="tiny-v3", prompt=PROMPT, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0]
    echoed = client.completions.create(model="tiny-v3", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True}).choices[0]
    assert echoed.text == PROMPT + plain.text and echoed.logprobs is None


def test_max_tokens_zero_returns_the_prompt(client):
    r = client.completions.create(model="tiny-v3", prompt=PROMPT, max_tokens=0, echo=True)
    assert r.choices[0].text == PROMPT and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 0


def test_max_tokens_zero_without_echo_is_refused(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny-v3", "prompt": "a", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_chat_still_has_no_echo_of_the_prompt(client):
    r = client.chat.completions.create(model="tiny-v3", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       temperature=0, extra_body={"echo": True})
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize("k", [1, 3])
def test_prompt_logprobs_match_offline(client, ref, k):
    lp = echo(client, PROMPT, logprobs=k).logprobs
    ids, offline = prompt_logprobs(ref, PROMPT, k)
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for got, tid, entry in zip(lp.token_logprobs[1:], ids[1:], offline[1:]):
        assert got == pytest.approx(entry[tid].logprob, abs=1e-4)


def test_tokens_offsets_and_top_logprobs(client):
    c = echo(client, PROMPT, logprobs=2)
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text == PROMPT
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert c.text[offset:offset + len(token)] == token
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]):
        assert token in top or len(top) == 3
        assert len(top) in (2, 3)


def test_echo_with_generated_tokens_and_token_id_prompt(client, server):
    ids = server.llm.get_tokenizer().encode(PROMPT, add_special_tokens=False)
    c = client.completions.create(model="tiny-v3", prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=1,
                                  extra_body={"ignore_eos": True}).choices[0]
    lp = c.logprobs
    assert c.text.startswith(PROMPT) and len(lp.tokens) == len(ids) + 3
    assert "".join(lp.tokens) == c.text and lp.text_offset[len(ids)] == len(PROMPT)


def test_prompt_list_gives_a_choice_per_prompt_in_order(client):
    prompts = ["one two", "three four five"]
    r = client.completions.create(model="tiny-v3", prompt=prompts, max_tokens=0, echo=True, n=2, temperature=0,
                                  logprobs=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert all("".join(c.logprobs.tokens) == c.text for c in r.choices)
    assert r.choices[0].logprobs.token_logprobs == r.choices[1].logprobs.token_logprobs


def test_streamed_echo(client):
    stream = client.completions.create(model="tiny-v3", prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                       logprobs=1, stream=True, extra_body={"ignore_eos": True})
    chunks = [c for c in stream if c.choices]
    whole = echo(client, PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-4)


def test_streamed_echo_of_max_tokens_zero(client):
    chunks = [c for c in client.completions.create(model="tiny-v3", prompt=PROMPT, max_tokens=0, echo=True,
                                                   stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    assert chunks[-1].choices[0].finish_reason == "length"


def continuation_score(client, context_ids, continuation_ids):
    """What lm-eval's local-completions does for a multiple-choice option (its prompt as token ids): the summed
    logprobs of the continuation's tokens, the last ones of the echoed prompt."""
    lp = echo(client, context_ids + continuation_ids).logprobs
    assert len(lp.token_logprobs) == len(context_ids) + len(continuation_ids)
    return sum(lp.token_logprobs[-len(continuation_ids):])


def test_lm_eval_shaped_scoring_prefers_the_likely_continuation(client, ref):
    context = ref.get_tokenizer().encode("a b c a b c a b c a b")
    likely = ref.generate({"prompt_token_ids": context}, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    unlikely = [t + 1 for t in likely]
    assert continuation_score(client, context, likely) > continuation_score(client, context, unlikely)
