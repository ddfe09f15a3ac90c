"""The training-free sparse mode through the engine: off by default, exactly dense on short contexts, the same
whether a prompt is prefilled in one step or in chunks, and its options checked."""
import argparse
import json
import math

import pytest

from dsinfer import LLM, SamplingParams
from dsinfer.cli import sparse_json
from tests.conftest import random_prompts

SPARSE = {"sink": 4, "window": 16, "topk_blocks": 2}  # a context of up to 36 keeps everything


@pytest.fixture(scope="module")
def sparse_llms(ckpts):
    made = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in made:
            made[key] = LLM(ckpts["v3"], dtype="float32", sparse_attention=SPARSE, **kw)
        return made[key]
    return get


def logprobs(llm, prompt):
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    return [out[0].prompt_logprobs[j][prompt[j]].logprob for j in range(1, len(prompt))]


def test_short_contexts_equal_dense_exactly_and_long_ones_do_not(sparse_llms, llms):
    short, long = random_prompts((36, 160), seed=11)
    assert logprobs(sparse_llms(), short) == logprobs(llms("v3"), short)
    sparse, dense = logprobs(sparse_llms(), long), logprobs(llms("v3"), long)
    assert max(abs(a - b) for a, b in zip(sparse[:47], dense[:47])) < 1e-4  # positions < 48 keep everything
    assert max(abs(a - b) for a, b in zip(sparse[48:], dense[48:])) > 1e-3


def test_chunked_prefill_and_decode_select_as_one_pass(sparse_llms):
    prompt = random_prompts((150,), seed=12)[0]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    whole = sparse_llms(enable_prefix_caching=False).generate({"prompt_token_ids": prompt}, sp)[0].outputs[0]
    chunked = sparse_llms(max_num_batched_tokens=37, enable_prefix_caching=False).generate(
        {"prompt_token_ids": prompt}, sp)[0].outputs[0]
    assert whole.token_ids == chunked.token_ids
    assert whole.cumulative_logprob == pytest.approx(chunked.cumulative_logprob, abs=1e-3)
    assert logprobs(sparse_llms(), prompt) == pytest.approx(
        logprobs(sparse_llms(max_num_batched_tokens=37, enable_prefix_caching=False), prompt), abs=1e-4)


def test_sparse_options_are_checked(ckpts):
    with pytest.raises(ValueError, match="block_size"):
        LLM(ckpts["v3"], sparse_attention={"window": 8})
    with pytest.raises(ValueError, match="unknown sparse_attention field"):
        LLM(ckpts["v3"], sparse_attention={"windw": 64})
    with pytest.raises(argparse.ArgumentTypeError, match="sparse-attention"):
        sparse_json('{"sink": 4,')
    assert sparse_json('{"sink": 4, "window": 64}') == {"sink": 4, "window": 64}


def test_bf16_sparse_runs(ckpts, sparse_llms):
    """bf16 weights and cache run the sparse mode; on these random weights 16-bit rounding flips near-tied block
    choices, so only the positions that keep their whole context are compared with fp32. There the random tiny
    model's bf16 logprobs sit about 0.05 from fp32, with single positions up to ~3 (as dense bf16 does)."""
    prompt = random_prompts((120,), seed=13)[0]
    ref = logprobs(sparse_llms(), prompt)
    got = logprobs(LLM(ckpts["v3"], dtype="bfloat16", sparse_attention=SPARSE), prompt)
    assert all(math.isfinite(x) for x in got)
    diffs = sorted(abs(a - b) for a, b in zip(got[:47], ref[:47]))
    assert diffs[23] < 0.1 and sum(diffs) / 47 < 0.25


def test_cli_takes_sparse_attention_json(ckpts, sparse_llms):
    from tests.test_llm import run_cli
    prompt = "def parse(text):\n    " * 12  # long enough for the sparse path
    r = run_cli("generate", "--model", str(ckpts["v3"]), prompt, "--max-tokens", "6", "--sparse-attention",
                json.dumps(SPARSE))
    assert r.returncode == 0, r.stderr
    want = sparse_llms().generate(prompt, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text
    assert r.stdout == want + "\n"
    bad = run_cli("generate", "--model", str(ckpts["v3"]), "x", "--sparse-attention", '{"sink": -1}')
    assert bad.returncode == 2 and "sparse_attention.sink" in bad.stderr and "Traceback" not in bad.stderr
