import pytest
import torch

from dsinfer import SamplingParams
from dsinfer.engine.sampler import apply_penalties, filter_logits
from dsinfer.engine.sequence import Sequence
from tests.conftest import random_prompts


def seq(params, prompt=(1, 2), outputs=()):
    s = Sequence(0, "r", 0, list(prompt), params, 100, None)
    s.token_ids += list(outputs)
    return s


@pytest.mark.parametrize("field, value, message", [
    ("n", 0, "n must be >= 1"), ("temperature", -0.1, "temperature must be >= 0"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"), ("top_p", 0, "top_p"), ("top_k", -2, "top_k must be >= -1"),
    ("min_p", 2, "min_p"), ("max_tokens", 0, "max_tokens must be >= 1"), ("presence_penalty", 3, "presence_penalty"),
    ("repetition_penalty", 0, "repetition_penalty must be > 0"), ("logprobs", -1, "logprobs must be >= 0"),
    ("stop", [""], "stop must be"), ("stop_token_ids", [-1], "stop_token_ids"), ("n", 1.5, "n must be an int"),
    ("temperature", float("nan"), "temperature must be a number"),
    ("logit_bias", {1: 101}, r"logit_bias values must be in \[-100, 100\]"),
    ("logit_bias", {"x": 1}, "logit_bias keys"), ("logit_bias", {-1: 1}, "logit_bias keys"),
    ("allowed_token_ids", [], "allowed_token_ids must not be empty"),
    ("allowed_token_ids", [1, -2], "allowed_token_ids"), ("bad_words", [" "], "bad_words"),
    ("include_stop_str_in_output", 1, "include_stop_str_in_output"),
    ("truncate_prompt_tokens", 0, "truncate_prompt_tokens must be >= 1"),
])
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"SamplingParams.{message}"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=2)


def test_filters_keep_what_they_should():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    seqs = [seq(SamplingParams(top_k=2)), seq(SamplingParams(top_p=0.7)), seq(SamplingParams(min_p=0.4))]
    kept = torch.isfinite(filter_logits(x.clone(), seqs)).tolist()
    assert kept == [[True, True, False, False], [True, True, False, False], [True, True, False, False]]


def test_penalties_follow_vllm():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]] * 2)
    s_rep = seq(SamplingParams(repetition_penalty=2.0), prompt=[0], outputs=[1])
    s_freq = seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[3], outputs=[2, 2, 0])
    out = apply_penalties(logits.clone(), [s_rep, s_freq])
    assert out[0].tolist() == [1.0, -4.0, 1.0, 1.0]
    assert out[1].tolist() == [2.0 - 0.75, -2.0, 1.0 - 1.0, 1.0]  # prompt token 3 is not penalised


def gen(llm, prompts, **kw):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**kw))


def test_seeded_sampling_is_reproducible_in_any_batch(llms):
    llm = llms("v3")
    p = random_prompts((6, 20))
    a = gen(llm, p, temperature=1.0, seed=7, max_tokens=12)
    b = gen(llm, p[::-1], temperature=1.0, seed=7, max_tokens=12)[::-1]
    c = gen(llm, p, temperature=1.0, seed=8, max_tokens=12)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.outputs[0].token_ids for o in a] != [o.outputs[0].token_ids for o in c]


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_down_to_one_token_equal_greedy(llms, kw):
    p = random_prompts((9,))
    greedy = gen(llms("v3"), p, temperature=0, max_tokens=10, ignore_eos=True)[0].outputs[0].token_ids
    assert gen(llms("v3"), p, temperature=1.0, max_tokens=10, ignore_eos=True, **kw)[0].outputs[0].token_ids == greedy


def test_n_samples(llms):
    out = gen(llms("v3"), random_prompts((5,)), n=3, temperature=1.0, seed=1, max_tokens=6)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_stop_token_ids_and_min_tokens(llms):
    p = random_prompts((11,))
    ids = gen(llms("v3"), p, temperature=0, max_tokens=20, ignore_eos=True)[0].outputs[0].token_ids
    stop = ids[4]
    out = gen(llms("v3"), p, temperature=0, max_tokens=20, stop_token_ids=[stop])[0].outputs[0]
    assert out.token_ids == ids[:ids.index(stop) + 1] and out.finish_reason == "stop" and out.stop_reason == stop
    out = gen(llms("v3"), p, temperature=0, max_tokens=20, stop_token_ids=[stop], min_tokens=8)[0].outputs[0]
    assert stop not in out.token_ids[:8]


def test_logprobs_per_token(llms):
    out = gen(llms("v3"), random_prompts((7,)), temperature=1.0, seed=3, max_tokens=5, logprobs=3)[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and 3 <= len(entry) <= 4
        assert {1, 2, 3} <= {lp.rank for lp in entry.values()}
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


@pytest.fixture(scope="module")
def builtin():
    """The built-in model, which has a tokenizer (the tiny checkpoints have none)."""
    from dsinfer import LLM
    return LLM()


def greedy_ids(llm, prompt, **kw):
    return gen(llm, [prompt], temperature=0, ignore_eos=True, **kw)[0].outputs[0].token_ids


@pytest.mark.parametrize("field, value", [("logit_bias", {100000: 1.0}), ("allowed_token_ids", [3, 100000])])
def test_token_ids_outside_the_vocabulary_name_the_field(llms, field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}.*outside the vocabulary"):
        gen(llms("v3"), random_prompts((4,)), **{field: value})


def test_logit_bias_makes_greedy_pick_the_token_and_keeps_raw_logprobs(llms):
    p = random_prompts((8,))[0]
    plain = greedy_ids(llms("v3"), p, max_tokens=6)
    target = next(t for t in range(3, 512) if t not in plain)
    out = gen(llms("v3"), [p], temperature=0, ignore_eos=True, max_tokens=6, logprobs=1,
              logit_bias={str(target): 100})[0].outputs[0]
    assert out.token_ids == [target] * 6
    first = out.logprobs[0]
    assert first[target].rank > 1 and first[plain[0]].rank == 1  # the raw model's distribution
    assert greedy_ids(llms("v3"), p, max_tokens=6, logit_bias={plain[0]: -100})[0] != plain[0]


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, seed=4), dict(temperature=1.0, top_k=5)])
def test_allowed_token_ids_only_those_are_sampled(llms, kw):
    p = random_prompts((8, 13))
    outs = gen(llms("v3"), p, max_tokens=12, ignore_eos=True, allowed_token_ids=[17, 230], **kw)
    for o in outs:
        assert set(o.outputs[0].token_ids) <= {17, 230}


def test_rules_apply_per_sequence_in_a_batch(llms):
    p = random_prompts((8, 9))
    plain = [greedy_ids(llms("v3"), x, max_tokens=5) for x in p]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=5, allowed_token_ids=[40]),
              SamplingParams(temperature=0, ignore_eos=True, max_tokens=5)]
    outs = llms("v3").generate([{"prompt_token_ids": x} for x in p], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == [40] * 5 and outs[1].outputs[0].token_ids == plain[1]


def contains(ids, word):
    return any(ids[i:i + len(word)] == word for i in range(len(ids) - len(word) + 1))


def test_bad_words_never_appear(builtin):
    prompt, tok = "The capital of France is", builtin.get_tokenizer()
    plain = builtin.generate(prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert " the" in plain.text
    words = ["the", tok.decode(plain.token_ids[2:4]).strip()]
    forms = [tok.encode(t, add_special_tokens=False) for w in words for t in (w, " " + w)]
    assert any(len(f) > 1 and contains(plain.token_ids, f) for f in forms)  # a several-token word is in play
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=2)):
        out = builtin.generate(prompt, SamplingParams(max_tokens=24, bad_words=words, **kw),
                               use_tqdm=False)[0].outputs[0]
        assert not any(contains(out.token_ids, f) for f in forms), (out.text, forms)


def test_bad_words_need_a_tokenizer(llms, monkeypatch):
    engine = llms("v3").engine
    monkeypatch.setattr(engine, "tokenizer", None)
    with pytest.raises(ValueError, match="SamplingParams.bad_words needs a tokenizer"):
        engine.check_params(SamplingParams(bad_words=["x"]))


def test_include_stop_str_in_output(builtin):
    prompt = "The capital of France is"
    plain = builtin.generate(prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    stop = plain.text[8:12]
    cut = plain.text[:plain.text.index(stop)]
    for include, text in ((False, cut), (True, cut + stop)):
        sp = SamplingParams(temperature=0, max_tokens=24, stop=stop, include_stop_str_in_output=include)
        out = builtin.generate(prompt, sp, use_tqdm=False)[0].outputs[0]
        assert out.text == text and out.finish_reason == "stop" and out.stop_reason == stop


def test_truncate_prompt_tokens_keeps_the_last_ones(llms):
    llm = llms("v3", max_model_len=64)
    p = random_prompts((100,))[0]  # longer than max_model_len: only truncation lets it in
    out = gen(llm, [p], temperature=0, ignore_eos=True, max_tokens=6, truncate_prompt_tokens=10)[0]
    assert out.prompt_token_ids == p[-10:]
    assert out.outputs[0].token_ids == greedy_ids(llm, p[-10:], max_tokens=6)
