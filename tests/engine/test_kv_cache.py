import pytest
import torch

from dsinfer import LLM, SamplingParams
from tests.conftest import random_prompts


def test_kv_bytes_per_token_is_the_latent_formula(llms):
    """Only kv_lora_rank + qk_rope_head_dim values per token and layer are cached, never per-head K/V."""
    llm = llms("v3")
    cfg = llm.model.config
    formula = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert llm.engine.cache.bytes_per_token == llm.engine.stats().kv_bytes_per_token == formula
    assert all(t.shape[1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim for t in llm.engine.cache.layers)


def test_cache_size_follows_the_memory_budget(ckpts):
    budget = 1_000_000
    llm = LLM(ckpts["v3"], kv_cache_memory=budget, max_model_len=256)
    stats = llm.engine.stats()
    per_block = stats.kv_bytes_per_token * stats.kv_block_size
    assert stats.kv_blocks_total == budget // per_block and stats.kv_cache_bytes <= budget


def test_budget_smaller_than_one_sequence_is_refused(ckpts):
    with pytest.raises(ValueError, match="holds 128 tokens, fewer than max_model_len .256.; raise kv_cache_memory"):
        LLM(ckpts["v3"], kv_cache_memory=128 * 4 * 48 * 4, max_model_len=256)


def test_blocks_are_returned_after_generation(llms):
    engine = llms("v2").engine
    llms("v2").generate([{"prompt_token_ids": [3] * n} for n in (5, 40, 90)], SamplingParams(max_tokens=20, n=2))
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_free == stats.kv_blocks_total


def test_abort_frees_blocks_at_once(llms):
    llm = llms("v2")
    engine = llm.engine
    (rid,) = llm.add_requests([{"prompt_token_ids": [4] * 50}], SamplingParams(max_tokens=30, n=2))
    engine.step()
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    engine.abort(rid)
    assert not engine.has_unfinished() and engine.stats().kv_blocks_used == 0


def test_abort_of_a_waiting_request(llms):
    llm = llms("v3", max_num_seqs=1)
    a, b = llm.add_requests([{"prompt_token_ids": p} for p in random_prompts([30, 30])], SamplingParams(max_tokens=5))
    llm.engine.step()
    llm.engine.abort(b)
    outs = []
    while llm.engine.has_unfinished():
        outs += llm.engine.step()
    assert {o.request_id for o in outs} == {a} and llm.engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("kv_dtype,row", [("float32", lambda r, dr: 4 * (r + dr)), ("bfloat16", lambda r, dr: 2 * (r + dr)),
                                          ("fp8", lambda r, dr: r + 4 * -(-r // 128) + 2 * dr)])
def test_kv_bytes_per_token_per_cache_dtype(ckpts, kv_dtype, row):
    """fp8 is DeepSeek's layout: e4m3 latent, one fp32 scale per 128 values, bf16 rope (656 bytes at 512 + 64)."""
    budget = 2_000_000
    llm = LLM(ckpts["v3"], kv_cache_dtype=kv_dtype, kv_cache_memory=budget, max_model_len=256)
    cfg, stats = llm.model.config, llm.engine.stats()
    formula = cfg.num_hidden_layers * row(cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    assert llm.engine.cache.bytes_per_token == stats.kv_bytes_per_token == formula
    assert stats.kv_blocks_total == budget // (formula * stats.kv_block_size)  # a smaller row: more tokens
    assert stats.kv_cache_bytes == stats.kv_blocks_total * stats.kv_block_size * formula


@pytest.mark.parametrize("kv_dtype,mean_tol", [("bfloat16", 0.15), ("fp8", 0.6)])
def test_compact_caches_stay_close_to_fp32(ckpts, kv_dtype, mean_tol):
    """Prompt logprobs (chunked prefill reads the cache back) with a bf16 or fp8 cache against fp32. The random
    test model is sensitive (bf16 moves it by 0.08 nats on average); a cache read back wrongly moves it by nats.
    benchmarks/kv_quality.py measures the trained built-in model."""
    prompts = [{"prompt_token_ids": p} for p in random_prompts([40, 90])]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    ref, got = (LLM(ckpts["v3"], kv_cache_dtype=d, max_num_batched_tokens=32).generate(prompts, sp, use_tqdm=False)
                for d in ("float32", kv_dtype))
    for a, b in zip(ref, got):
        la = torch.tensor([next(iter(d.values())).logprob for d in a.prompt_logprobs[1:]])
        lb = torch.tensor([next(iter(d.values())).logprob for d in b.prompt_logprobs[1:]])
        assert 0 < float((la - lb).abs().mean()) < mean_tol  # the cache really is compact, and close
        assert len(b.outputs[0].token_ids) == 8


def test_unknown_cache_dtype_is_refused(ckpts):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(ckpts["v3"], kv_cache_dtype="int4")
