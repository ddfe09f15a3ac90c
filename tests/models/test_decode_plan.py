"""Decode batches through whole layers in one C call (models/decode_plan.py) against the Python layers."""
import pytest

from dsinfer import LLM, SamplingParams, kernels
from dsinfer.models import decode_plan
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")


@pytest.fixture
def fused_runs(monkeypatch):
    calls = []
    run = decode_plan.run
    monkeypatch.setattr(decode_plan, "run", lambda *a: calls.append(a[1].shape[0]) or run(*a))
    yield calls
    decode_plan.set_enabled(True)
    kernels.set_enabled(True)


def generate(llm, prompts):
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)


@pytest.mark.parametrize("name", ["v2-lite", "v2", "v3"])
def test_fused_layers_generate_what_the_python_layers_do(name, ckpts, fused_runs):
    prompts = random_prompts([5, 17, 40]) + random_prompts([300], seed=7)  # 300: several attention chunks
    results = []
    for eager in (False, True):
        llm = LLM(ckpts[name], enforce_eager=eager)
        results.append([generate(llm, prompts), generate(llm, prompts[-1:])])  # batched decodes, then one stream
    assert fused_runs and max(fused_runs) == len(prompts) and min(fused_runs) == 1  # the first pass only
    for fused, plain in zip(*results):
        for a, b in zip(fused, plain):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)


def test_switches_and_unsupported_weights_keep_the_python_layers(ckpts, fused_runs):
    prompts = random_prompts([6, 9])
    generate(LLM(ckpts["v3"], enforce_eager=True), prompts)
    generate(LLM(ckpts["v3"], cpu_kernels=False), prompts)
    q8 = LLM(ckpts["v3"], quantization="int8", enforce_eager=False, cpu_kernels=True)
    generate(q8, prompts)
    decompressed = LLM(ckpts["v3"], mla_mode="decompressed")
    generate(decompressed, prompts)
    assert fused_runs == [] and q8.model.model.plan == [] == decompressed.model.model.plan  # no plan for these
