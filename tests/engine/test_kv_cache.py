import torch

from dsinfer.engine.sequence import Sequence
from dsinfer.sampling_params import SamplingParams


def test_kv_bytes_per_token_is_the_latent_formula(llms):
    """Only kv_lora_rank + qk_rope_head_dim values per token and layer are cached, never per-head K/V."""
    llm = llms("v3")
    cfg = llm.model.config
    cache = llm.engine.cache
    assert cache.bytes_per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert all(t.shape[1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim for t in cache.layers)


def test_blocks_are_returned_after_generation(llms):
    llm = llms("v2")
    cache = llm.engine.cache
    llm.generate([{"prompt_token_ids": [3] * n} for n in (5, 40, 90)], SamplingParams(max_tokens=20, n=2))
    assert len(cache.free_blocks) == cache.num_blocks


def test_cache_grows_when_full(llms):
    cache = llms("v2").engine.cache
    before = cache.num_blocks
    seq = Sequence(0, "r", 0, [1], SamplingParams(), 1, None)
    cache.reserve(seq, (before + 3) * cache.block_size)
    assert cache.num_blocks >= before + 3 and len(seq.block_table) == before + 3
    cache.free(seq)
    assert len(cache.free_blocks) == cache.num_blocks and cache.layers[0].dtype == torch.float32


def test_abort_frees_blocks_at_once(llms):
    llm = llms("v2")
    engine, cache = llm.engine, llm.engine.cache
    (rid,) = llm.add_requests([{"prompt_token_ids": [4] * 50}], SamplingParams(max_tokens=30, n=2))
    engine.step()
    engine.step()
    assert len(cache.free_blocks) < cache.num_blocks
    engine.abort(rid)
    assert not engine.has_unfinished() and len(cache.free_blocks) == cache.num_blocks
