import pytest

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
