"""dsinfer against transformers on the same tiny checkpoints, fp32: every prompt position and 32 greedy tokens."""
import pytest
import torch

from dsinfer import SamplingParams
from tests.conftest import random_prompts
from tests.reference import hf_greedy, hf_logprobs

MODELS = ["v2-lite", "v2", "v3", "v3-fp8"]
REFERENCE = {"v3-fp8": "v3-fp8-ref"}  # transformers reads the dequantized copy of the FP8 checkpoint
LENGTHS = (5, 17, 33, 61)


def our_prompt_logprobs(llm, prompts, k=5):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k))
    return [o.prompt_logprobs for o in outs]


@pytest.mark.parametrize("name", MODELS)
def test_prompt_logprobs_match_transformers(name, ckpts, llms):
    prompts = random_prompts(LENGTHS)
    ours = our_prompt_logprobs(llms(name), prompts)
    for prompt, plp in zip(prompts, ours):
        ref = hf_logprobs(ckpts[REFERENCE.get(name, name)], prompt)
        assert plp[0] is None and len(plp) == len(prompt)
        for j in range(1, len(prompt)):
            actual = plp[j][prompt[j]]
            assert actual.logprob == pytest.approx(ref[j - 1, prompt[j]].item(), abs=1e-4)
            assert actual.rank == int((ref[j - 1] > ref[j - 1, prompt[j]]).sum()) + 1
            top = ref[j - 1].topk(5)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert plp[j][t].logprob == pytest.approx(v, abs=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_32_tokens_match_transformers(name, ckpts, llms):
    prompts = random_prompts(LENGTHS, seed=1)
    outs = llms(name).generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(ckpts[REFERENCE.get(name, name)], prompt, 32)
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_absorbed_equals_decompressed(name, llms):
    """The absorbed path run over whole prompts gives the same logprobs as decompression."""
    prompts = random_prompts(LENGTHS, seed=2)
    a = our_prompt_logprobs(llms(name, mla_mode="absorbed"), prompts)
    d = our_prompt_logprobs(llms(name, mla_mode="decompressed"), prompts)
    for pa, pd, prompt in zip(a, d, prompts):
        for j in range(1, len(prompt)):
            assert pa[j][prompt[j]].logprob == pytest.approx(pd[j][prompt[j]].logprob, abs=1e-4)


def test_decode_paths_agree_over_generation(llms):
    """auto (decompressed prefill, absorbed decode) and all-decompressed generate the same tokens."""
    prompts = [{"prompt_token_ids": p} for p in random_prompts(LENGTHS, seed=3)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    auto, dec = llms("v2").generate(prompts, sp), llms("v2", mla_mode="decompressed").generate(prompts, sp)
    for x, y in zip(auto, dec):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].cumulative_logprob == pytest.approx(y.outputs[0].cumulative_logprob, abs=1e-3)


def test_batched_equals_alone(llms):
    llm = llms("v3")
    prompts = [{"prompt_token_ids": p} for p in random_prompts((3, 29, 12), seed=4)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    together = llm.generate(prompts, sp)
    for p, t in zip(prompts, together):
        assert llm.generate(p, sp)[0].outputs[0].token_ids == t.outputs[0].token_ids


def test_bf16_runs_close_to_fp32(llms):
    """bf16 weights and activations stay near fp32 on the same weights. Over six prompts: the mean of one prompt's
    19 differences moved by a third when a bf16 kernel rounded differently (closer to exact)."""
    prompts = random_prompts((20,) * 6, seed=5)
    lp32 = our_prompt_logprobs(llms("v3"), prompts)
    lp16 = our_prompt_logprobs(llms("v3", dtype="bfloat16"), prompts)
    diffs = [abs(a[j][t].logprob - b[j][t].logprob) for p, a, b in zip(prompts, lp32, lp16) for j, t in enumerate(p) if j]
    assert max(diffs) < 0.8 and sum(diffs) / len(diffs) < 0.08
    assert llms("v3", dtype="bfloat16").model.model.embed_tokens.dtype == torch.bfloat16
