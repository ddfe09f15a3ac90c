"""GLM-MoE-DSA (V3.2's sparse attention with an interleaved indexer rope, and a "shared" layer that reuses the
previous full layer's top-k) against transformers' GlmMoeDsaForCausalLM, fp32, prompts past index_topk (12)."""
import pytest

from dsinfer import LLM, SamplingParams
from tests.conftest import random_prompts
from tests.dsa_checkpoints import build_glm_dsa
from tests.models.test_deepseek_v32 import assert_matches_reference, prompt_logprobs
from tests.reference import hf_greedy


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    path = build_glm_dsa(tmp_path_factory.mktemp("glm") / "glm")
    return path, LLM(path, dtype="float32", max_num_batched_tokens=40)


def test_prompt_logprobs_match_transformers_chunked(glm):
    path, llm = glm
    prompts = random_prompts((9, 70, 101), seed=20)
    assert_matches_reference(path, prompts, prompt_logprobs(llm, prompts))


def test_greedy_32_tokens_match_transformers(glm):
    path, llm = glm
    prompts = random_prompts((15, 66), seed=21)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 32)


def test_shared_layer_has_no_indexer_and_caches_no_keys(glm):
    _, llm = glm
    attn = [layer.self_attn for layer in llm.model.model.layers]
    assert [a.indexer is not None for a in attn] == [True, False, True]
    assert [t.shape[1] for t in llm.engine.cache.index_layers] == [32, 0, 32]


def test_disk_tier_round_trip_without_shared_layer_keys(glm, tmp_path):
    path, llm = glm
    prompt = random_prompts((70,), seed=22)[0]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = llm.generate({"prompt_token_ids": prompt}, sp)[0].outputs[0].token_ids
    for hits in (0, 4):
        with LLM(path, dtype="float32", prefix_cache_dir=tmp_path) as disk:
            assert disk.generate({"prompt_token_ids": prompt}, sp)[0].outputs[0].token_ids == want
            assert disk.engine.stats().disk_hit_blocks == hits
