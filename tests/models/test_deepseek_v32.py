"""DeepSeek-V3.2 (DeepSeek sparse attention) against transformers' DeepseekV32ForCausalLM, fp32, with prompts
several times longer than index_topk (12) so that every layer attends to a real top-k subset."""
import math

import pytest
import torch

from dsinfer import LLM, SamplingParams
from dsinfer.engine.kv_cache import bytes_per_token
from dsinfer.layers import sparse_attention
from dsinfer.models.loader import CheckpointError, read_config
from tests.conftest import random_prompts
from tests.dsa_checkpoints import build_v32, relabel
from tests.reference import hf_greedy, hf_logprobs

LENGTHS = (7, 40, 83, 130)


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    return build_v32(tmp_path_factory.mktemp("v32") / "v32")


@pytest.fixture(scope="module")
def llm32(v32):
    cache = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = LLM(v32, dtype="float32", **kw)
        return cache[key]
    return get


def prompt_logprobs(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))
    return [o.prompt_logprobs for o in outs]


def assert_matches_reference(path, prompts, ours):
    for prompt, plp in zip(prompts, ours):
        ref = hf_logprobs(path, prompt)
        for j in range(1, len(prompt)):
            assert plp[j][prompt[j]].logprob == pytest.approx(ref[j - 1, prompt[j]].item(), abs=1e-4), (len(prompt), j)
            top = ref[j - 1].topk(3)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert plp[j][t].logprob == pytest.approx(v, abs=1e-4)


def test_prompt_logprobs_match_transformers_in_one_batch(v32, llm32):
    prompts = random_prompts(LENGTHS)
    assert_matches_reference(v32, prompts, prompt_logprobs(llm32(), prompts))


@pytest.mark.parametrize("chunk", [16, 45])
def test_chunked_prefill_matches_transformers(v32, llm32, chunk):
    prompts = random_prompts(LENGTHS[1:], seed=1)
    llm = llm32(max_num_batched_tokens=chunk, enable_prefix_caching=False)
    assert_matches_reference(v32, prompts, prompt_logprobs(llm, prompts))


def test_prefix_cache_hits_reuse_indexer_keys(v32, llm32):
    """A prompt sharing a long prefix with an earlier one takes those blocks (latent and indexer keys) from the
    prefix cache and still generates what transformers does; with prefix caching off, the same."""
    base = random_prompts((96,), seed=2)[0]
    first, second = base + random_prompts((20,), seed=3)[0], base + random_prompts((9,), seed=4)[0]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    expected = hf_greedy(v32, second, 8)
    for caching in (True, False):
        llm = llm32(enable_prefix_caching=caching, max_num_batched_tokens=64)
        llm.generate({"prompt_token_ids": first}, sp)
        hits = llm.engine.stats().prefix_cache_hit_tokens
        out = llm.generate({"prompt_token_ids": second}, sp)[0].outputs[0]
        assert llm.engine.stats().prefix_cache_hit_tokens - hits == (96 if caching else 0)
        assert out.token_ids == expected
        lp = hf_logprobs(v32, second)[-1, expected[0]].item()
        assert out.logprobs[0][expected[0]].logprob == pytest.approx(lp, abs=1e-4)


def test_greedy_32_tokens_match_transformers(v32, llm32):
    prompts = random_prompts((20, 77), seed=5)
    outs = llm32().generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(v32, prompt, 32)


def test_attention_gathers_only_index_topk_rows(llm32, monkeypatch):
    """Past index_topk tokens, every query's attention reads at most index_topk latent rows, decodes included."""
    widths = []
    real = sparse_attention.gathered_attention

    def spy(qc, rows, valid, *args):
        widths.append((rows.shape[1], int(valid.sum(1).max())))
        return real(qc, rows, valid, *args)
    monkeypatch.setattr(sparse_attention, "gathered_attention", spy)
    llm32().generate({"prompt_token_ids": random_prompts((60,), seed=6)[0]},
                     SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert widths and all(w == 12 and kept == 12 for w, kept in widths)


def test_sparse_path_differs_from_dense_past_index_topk(llm32):
    """A step whose sequences hold at most index_topk tokens runs the dense path (the same bits); past it the
    indexer changes attention, except at positions that still see at most index_topk keys, where every key is
    kept (the same up to rounding)."""
    prompts = random_prompts((12, 70), seed=7)
    llm = llm32()
    sparse = [prompt_logprobs(llm, [p])[0] for p in prompts]
    llm.model.set_indexer(False)
    try:
        dense = [prompt_logprobs(llm, [p])[0] for p in prompts]
    finally:
        llm.model.set_indexer(True)
    short, long = [[abs(s[j][p[j]].logprob - d[j][p[j]].logprob) for j in range(1, len(p))]
                   for s, d, p in zip(sparse, dense, prompts)]
    assert max(short) == 0
    assert max(long[:11]) < 1e-5 and max(long[12:]) > 1e-3


def test_mislabelled_v32_checkpoint_is_an_error_naming_the_indexer(v32, tmp_path):
    bad = relabel(v32, tmp_path / "as-v3", "deepseek_v3")
    with pytest.raises(CheckpointError, match=r"self_attn\.indexer\.(wq_b|wk|k_norm|weights_proj)"):
        LLM(bad)


def test_kv_bytes_per_token_include_indexer_keys(v32, llm32):
    cfg = read_config(v32)
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert llm32().engine.stats().kv_bytes_per_token == cfg.num_hidden_layers * (latent + cfg.index_head_dim * 4)
    assert bytes_per_token(cfg, "bfloat16") == cfg.num_hidden_layers * (latent // 2 + cfg.index_head_dim * 2)


def test_sparse_decode_with_and_without_cpu_kernels(llm32):
    """Decodes absorb and expand through the C kernels where they are on; the plain torch path is the reference."""
    prompts = [{"prompt_token_ids": p} for p in random_prompts((30, 64), seed=8)]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    fast, plain = llm32().generate(prompts, sp), llm32(cpu_kernels=False).generate(prompts, sp)
    for a, b in zip(fast, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-4)


def test_disk_tier_restores_indexer_keys_with_their_blocks(v32, tmp_path):
    """Blocks written to the prefix cache's disk tier carry their indexer keys: a new engine that loads them
    generates what transformers does."""
    base = random_prompts((80,), seed=9)[0]
    second = base + random_prompts((7,), seed=10)[0]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(v32, dtype="float32", prefix_cache_dir=tmp_path) as llm:
        llm.generate({"prompt_token_ids": base + [5, 6, 7]}, sp)
    with LLM(v32, dtype="float32", prefix_cache_dir=tmp_path) as llm:
        out = llm.generate({"prompt_token_ids": second}, sp)[0].outputs[0]
        assert llm.engine.stats().disk_hit_blocks == 80 // 16
    assert out.token_ids == hf_greedy(v32, second, 6)


def test_bf16_weights_and_fp8_cache_keep_bf16_indexer_keys(v32, llm32):
    """16-bit weights and an fp8 latent cache keep the indexer keys in bf16. On these random weights the top-k
    boundary is full of near ties, which 16-bit rounding flips, so only the dense positions are compared."""
    prompt = random_prompts((90,), seed=11)[0]
    ref = prompt_logprobs(llm32(), [prompt])[0]
    for kw in (dict(dtype="bfloat16"), dict(dtype="float32", kv_cache_dtype="fp8")):
        llm = LLM(v32, **kw)
        assert llm.engine.cache.index_layers[0].dtype == torch.bfloat16
        got = prompt_logprobs(llm, [prompt])[0]
        assert all(math.isfinite(got[j][prompt[j]].logprob) for j in range(1, len(prompt)))
        assert max(abs(got[j][prompt[j]].logprob - ref[j][prompt[j]].logprob) for j in range(1, 12)) < 0.25, kw
