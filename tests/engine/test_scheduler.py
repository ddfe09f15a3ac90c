"""The serving engine end to end on a tiny V3 checkpoint: in fp32, greedy outputs do not depend on how requests
are batched, chunked, cached or preempted; no block leaks; admission stays inside the budget."""
import pytest

from dsinfer import LLM, SamplingParams
from dsinfer.engine.block_manager import BlockManager
from dsinfer.engine.config import EngineConfig
from dsinfer.engine.scheduler import Scheduler
from tests.conftest import random_prompts
from tests.engine.test_block_manager import DictTier, Rows, admit, evict_all, seq

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LENGTHS = [5, 40, 90, 17, 33, 64, 3, 120]


def prompts(lengths=LENGTHS, seed=0):
    return [{"prompt_token_ids": p} for p in random_prompts(lengths, seed=seed)]


def token_ids(llm, ps, sp=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(ps, sp, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(ckpts):
    """Each prompt run alone, with chunking and prefix caching off."""
    llm = LLM(ckpts["v3"], enable_prefix_caching=False, enable_chunked_prefill=False)
    return [token_ids(llm, [p])[0] for p in prompts()]


@pytest.mark.parametrize("options", [
    dict(),
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=1),
    dict(max_num_batched_tokens=7),
    dict(max_num_batched_tokens=16, enable_prefix_caching=False),
    dict(max_num_batched_tokens=100),
    dict(enable_chunked_prefill=False),
    dict(max_num_seqs=3),
    dict(length_bucketing=False, max_num_seqs=2),
    dict(mla_mode="absorbed", max_num_batched_tokens=13),
    dict(mla_mode="decompressed", max_num_batched_tokens=13),
], ids=str)
def test_greedy_is_the_same_however_requests_are_scheduled(options, ckpts, reference):
    llm = LLM(ckpts["v3"], max_model_len=200, **options)
    assert token_ids(llm, prompts()) == reference
    assert llm.engine.stats().kv_blocks_used == 0


def test_preemption_recomputes_to_the_same_tokens(ckpts, reference):
    llm = LLM(ckpts["v3"], max_model_len=200, kv_cache_memory=13 * 16 * 4 * 48 * 4)  # 13 blocks of 16 tokens
    assert token_ids(llm, prompts()) == reference
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.kv_blocks_used == 0


def test_admission_stays_inside_the_budget(ckpts):
    budget = 20 * 16 * 4 * 48 * 4
    llm = LLM(ckpts["v3"], max_model_len=200, kv_cache_memory=budget, max_num_batched_tokens=32)
    engine = llm.engine
    llm.add_requests(prompts(LENGTHS * 2), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert engine.cache.nbytes <= budget
    while engine.has_unfinished():
        engine.step()
        held = {b for s in engine.scheduler.running for b in s.block_table}
        stats = engine.stats()
        assert len(held) == stats.kv_blocks_used <= stats.kv_blocks_total == 20
        assert all(len(s.block_table) * 16 >= s.num_cached for s in engine.scheduler.running)
    assert engine.stats().kv_blocks_used == 0


def test_decodes_continue_while_a_long_prompt_is_prefilled(ckpts):
    llm = LLM(ckpts["v3"], max_model_len=400, max_num_batched_tokens=16)
    engine = llm.engine
    (short,) = llm.add_requests(prompts([4]), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()
    (long,) = llm.add_requests(prompts([300], seed=1), SamplingParams(temperature=0, max_tokens=2))
    produced = []
    while engine.requests[long][1][0].num_cached < 300:
        outs = {o.request_id: o for o in engine.step()}
        produced.append(len(outs[short].outputs[0].token_ids))
    assert len(produced) >= 300 // 16 and produced == list(range(produced[0], produced[0] + len(produced)))


def test_shared_prefix_is_computed_once(ckpts):
    llm = LLM(ckpts["v3"], max_model_len=300)
    system = random_prompts([128], seed=3)[0]
    ps = [{"prompt_token_ids": system + tail} for tail in random_prompts([5, 9, 20], seed=4)]
    first = token_ids(llm, ps[:1])
    before = llm.engine.stats().prompt_tokens_computed
    rest = token_ids(llm, ps[1:])
    stats = llm.engine.stats()
    assert stats.prompt_tokens_computed - before == 9 + 20 and stats.prefix_cache_hit_tokens == 2 * 128
    off = LLM(ckpts["v3"], max_model_len=300, enable_prefix_caching=False)
    assert first + rest == token_ids(off, ps)


def test_n_samples_share_the_prompt_blocks(ckpts):
    llm = LLM(ckpts["v3"], max_model_len=300)
    (out,) = llm.generate(prompts([100]), SamplingParams(n=4, seed=7, max_tokens=8, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.prompt_tokens_computed == 100 + 3 * (100 - 96) and stats.prefix_cache_hit_tokens == 3 * 96
    alone = LLM(ckpts["v3"], max_model_len=300, enable_prefix_caching=False)
    (ref,) = alone.generate(prompts([100]), SamplingParams(n=4, seed=7, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ref.outputs]


def test_a_conversation_reuses_its_earlier_turns(ckpts):
    llm = LLM(ckpts["v3"], max_model_len=300)
    turn1 = [{"role": "user", "content": "def parse(text):" * 6}]
    reply = llm.chat(turn1, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].text
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and again"}]
    prompt = llm.chat_prompt(turn2)["prompt_token_ids"]
    hits = llm.engine.stats().prefix_cache_hit_tokens
    llm.chat(turn2, SamplingParams(temperature=0, max_tokens=4))
    shared = len(llm.chat_prompt(turn1)["prompt_token_ids"])
    assert llm.engine.stats().prefix_cache_hit_tokens - hits >= shared // 16 * 16 > 0 and len(prompt) > shared


def test_prompt_logprobs_survive_chunking(ckpts):
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    whole = LLM(ckpts["v3"], enable_chunked_prefill=False).generate(prompts([50]), sp, use_tqdm=False)[0]
    chunked = LLM(ckpts["v3"], max_num_batched_tokens=8).generate(prompts([50]), sp, use_tqdm=False)[0]
    assert len(chunked.prompt_logprobs) == 50 and chunked.prompt_logprobs[0] is None
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:]):
        assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def test_expert_counts_add_up(ckpts):
    llm = LLM(ckpts["v3"])
    token_ids(llm, prompts([10, 20]), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    stats = llm.engine.stats()
    cfg = llm.model.config
    tokens = stats.prompt_tokens_computed + stats.generated_tokens - 2  # the last sampled tokens are not computed
    assert set(stats.expert_counts) == {i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
    assert all(sum(c) == tokens * cfg.num_experts_per_tok for c in stats.expert_counts.values())


def test_output_kinds(llms):
    llm = llms("v3")
    sp = dict(temperature=0, max_tokens=20, ignore_eos=True, stop=["zz"])
    full = llm.generate("import os", SamplingParams(**sp))[0].outputs[0]
    pieces = list(llm.stream("import os", SamplingParams(output_kind="delta", **sp)))
    assert "".join(p.outputs[0].text for p in pieces) == full.text
    assert sum((p.outputs[0].token_ids for p in pieces), []) == full.token_ids
    finals = list(llm.stream("import os", SamplingParams(output_kind="final_only", **sp)))
    assert len(finals) == 1 and finals[0].outputs[0].text == full.text


def test_bad_engine_options(ckpts):
    with pytest.raises(ValueError, match="max_num_batched_tokens .64. must be at least max_model_len .200."):
        LLM(ckpts["v3"], max_model_len=200, enable_chunked_prefill=False, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="max_num_seqs must be at least 1"):
        LLM(ckpts["v3"], max_num_seqs=0)


def test_a_block_that_fails_to_load_from_the_tier_is_computed_instead():
    """Without chunked prefill, a prompt whose tier block fails to load may no longer fit the step's budget left:
    it gives its blocks back, waits, and is admitted whole the next step. No block leaks."""
    tier = DictTier()
    bm = BlockManager(8, 4, tier=tier, cache=Rows())
    a = seq(list(range(13)))
    admit(bm, a), bm.free_seq(a)
    evict_all(bm)
    sched = Scheduler(EngineConfig(max_num_batched_tokens=16, enable_chunked_prefill=False), bm)
    first, again = seq([7] * 6, 1), seq(list(range(13)), 2)
    sched.add(first), sched.add(again)
    tier.broken.add(bm.cached_prefix(again).on_tier[0])
    assert sched.schedule() == [(first, 6)] and again.block_table == [] and list(sched.waiting) == [again]
    first.num_cached = 6
    first.token_ids.append(8)
    assert sched.schedule() == [(first, 1), (again, 13)]
    for s in (first, again):
        sched.finish(s)
    assert bm.num_free == 8


@pytest.mark.parametrize("kv", ["bfloat16", "fp8"])
def test_compact_caches_do_not_depend_on_scheduling_either(ckpts, kv):
    """With a bf16 or fp8 cache too: batched, chunked, prefix-cached and preempted runs give each prompt's tokens
    run alone (every path reads the same stored rows)."""
    alone = LLM(ckpts["v3"], kv_cache_dtype=kv, enable_prefix_caching=False, enable_chunked_prefill=False)
    want = [token_ids(alone, [p])[0] for p in prompts()]
    row = {"bfloat16": 48 * 2, "fp8": 32 + 4 + 16 * 2}[kv]  # bytes a token and layer at r = 32, dr = 16
    for options in (dict(max_num_batched_tokens=13), dict(kv_cache_memory=13 * 16 * 4 * row)):
        llm = LLM(ckpts["v3"], max_model_len=200, kv_cache_dtype=kv, **options)
        assert token_ids(llm, prompts() + prompts()[:3]) == want + want[:3]  # the repeats hit the prefix cache
        stats = llm.engine.stats()
        assert stats.kv_blocks_used == 0 and stats.prefix_cache_hit_tokens > 0
    assert stats.num_preemptions > 0
