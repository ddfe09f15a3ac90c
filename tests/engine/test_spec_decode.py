"""Speculative decoding with the MTP layer (engine/spec_decode.py): greedy requests give exactly the tokens they
give without it, however they are batched, chunked, cached or preempted, with real, random and perfect drafts;
blocks never leak; seeded sampled requests are reproducible; the options are checked."""
import pytest
import torch

from dsinfer import LLM, SamplingParams
from dsinfer.engine.config import EngineConfig
from dsinfer.engine.spec_decode import SpecDecoder
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LENGTHS = [5, 40, 90, 17, 33, 3]
ROW = 48 * 4  # cache bytes a token and layer (r = 32, dr = 16, fp32)


def spec(k: int) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k}


def prompts(lengths=LENGTHS):
    return [{"prompt_token_ids": p} for p in random_prompts(lengths)]


def token_ids(llm, ps, sp=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(ps, sp, use_tqdm=False)]


def assert_drained(llm):
    stats = llm.engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0


@pytest.fixture(scope="module")
def reference(ckpts):
    llm = LLM(ckpts["v3-mtp"], enable_prefix_caching=False, enable_chunked_prefill=False)
    return [token_ids(llm, [p])[0] for p in prompts()]


@pytest.mark.parametrize("k, options", [
    (1, dict()),
    (2, dict(max_num_batched_tokens=13)),
    (3, dict(max_num_batched_tokens=7, enable_prefix_caching=False)),
    (3, dict(max_num_seqs=2, enforce_eager=True)),  # the MTP layer through the Python layers
    (2, dict(kv_cache_memory=13 * 16 * 5 * ROW)),  # 13 blocks of 16 tokens: preempts
    (2, dict(spec_greedy_fast_path=False)),  # every step through the sampler's verification
    (2, dict(spec_draft_last_rows=False)),  # the MTP layer's MoE at every catch-up position
    (1, dict(spec_share_steps=False)),
    (2, dict(spec_draft_one_call=False)),  # the fused draft layer's calls from Python
    (2, dict(spec_chunk_drafts=False, spec_draft_quantization="int8")),
    (2, dict(spec_draft_quantization=None)),  # the draft in the model's precision
    (2, dict(spec_draft_quantization="int8")),
    (3, dict(spec_draft_quantization="int4", max_num_batched_tokens=13, enforce_eager=True)),
], ids=str)
def test_greedy_is_the_same_with_speculation(ckpts, reference, k, options):
    llm = LLM(ckpts["v3-mtp"], max_model_len=200, speculative_config=spec(k), **options)
    assert token_ids(llm, prompts() + prompts()[:2]) == reference + reference[:2]  # the repeats hit the cache
    assert_drained(llm)
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens[0] > 0 and len(stats.spec_draft_tokens) == k
    if "kv_cache_memory" in options:
        assert stats.num_preemptions > 0


def test_plain_greedy_steps_take_the_fast_path(ckpts, reference, monkeypatch):
    steps, original = [], SpecDecoder.greedy_step
    monkeypatch.setattr(SpecDecoder, "greedy_step", lambda self, batch: steps.append(batch) or original(self, batch))
    llm = LLM(ckpts["v3-mtp"], max_model_len=200, speculative_config=spec(2))
    assert token_ids(llm, prompts()) == reference
    assert len(steps) > 10 and any(len(batch) > 1 for batch in steps)


def test_bf16_verify_steps_run_as_plain_decodes(ckpts):
    """In bf16 the fused decoder and the Python layers round differently: verify steps of more than 8 tokens run
    through the fused decoder in chunks, as the plain decodes do, and give their tokens."""
    plain = LLM(ckpts["v3-mtp"], max_model_len=200, dtype="bfloat16")
    want = token_ids(plain, prompts())
    llm = LLM(ckpts["v3-mtp"], max_model_len=200, dtype="bfloat16", speculative_config=spec(3))
    if llm.engine.runner.fused is None:
        pytest.skip("no fused decoder here (no C kernels)")
    assert token_ids(llm, prompts()) == want


def test_each_prompt_alone(ckpts, reference):
    llm = LLM(ckpts["v3-mtp"], max_model_len=200, speculative_config=spec(3))
    assert [token_ids(llm, [p])[0] for p in prompts()] == reference


@pytest.fixture
def oracle(monkeypatch, reference):
    """Drafts from the reference continuation, wrong at every `wrong`-th output position (None: never)."""
    state = {"wrong": None}
    by_prompt = {tuple(p["prompt_token_ids"]): r for p, r in zip(prompts(), reference)}

    def propose(self, jobs):
        for j in jobs:
            s = j.seq
            i = s.num_outputs + len(s.draft_ids)
            want = by_prompt.get(tuple(s.token_ids[:s.num_prompt_tokens]), [])
            right = want[i] if i < len(want) else 3
            wrong = state["wrong"] and (i + 1) % state["wrong"] == 0
            s.draft_ids.append(right + 1 if wrong else right)
    monkeypatch.setattr(SpecDecoder, "propose", propose)
    return state


@pytest.mark.parametrize("wrong, options", [(None, dict()), (5, dict(max_num_batched_tokens=11)),
                                            (None, dict(kv_cache_memory=13 * 16 * 5 * ROW))], ids=str)
def test_accepted_drafts_give_the_same_tokens(ckpts, reference, oracle, wrong, options):
    """Drafts that are (mostly) right are accepted several at a time, across block boundaries and budgets."""
    oracle["wrong"] = wrong
    llm = LLM(ckpts["v3-mtp"], max_model_len=200, speculative_config=spec(3), **options)
    assert token_ids(llm, prompts() + prompts()[:2]) == reference + reference[:2]
    assert_drained(llm)
    stats = llm.engine.stats()
    if wrong is None:
        assert stats.spec_acceptance_rate == [1.0] * 3 and stats.spec_mean_accepted_length > 3
    else:
        assert sum(stats.spec_accepted_tokens) < sum(stats.spec_draft_tokens)
        assert stats.spec_acceptance_rate[2] > 0 and stats.spec_mean_accepted_length > 1.5


def test_abort_and_limits_free_every_block(ckpts, oracle):
    llm = LLM(ckpts["v3-mtp"], max_model_len=100, speculative_config=spec(3))
    engine = llm.engine
    ps = prompts()
    ids = llm.add_requests(ps, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    outs = {}
    for _ in range(4):
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    engine.abort(ids[1])
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert_drained(llm)
    for rid, p in zip(ids, ps):
        if rid != ids[1]:  # never past max_model_len, never past max_tokens
            n = len(outs[rid].outputs[0].token_ids)
            assert n == min(40, 100 - len(p["prompt_token_ids"]))


@pytest.mark.parametrize("options", [dict(), dict(quantization="int8")], ids=str)
def test_stops_and_logprobs_as_without_speculation(ckpts, reference, options):
    """Stop tokens, min_tokens, logprobs and prompt logprobs; with weights quantized on load too (the MTP layer
    stays in full precision; int8 logprobs move by a few hundredths with the batch, with or without speculation)."""
    stop = reference[0][10]
    sp = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop], logprobs=2, min_tokens=3,
                        prompt_logprobs=1)
    plain = LLM(ckpts["v3-mtp"], max_model_len=200, **options).generate(prompts(), sp, use_tqdm=False)
    ours = LLM(ckpts["v3-mtp"], max_model_len=200, speculative_config=spec(3), **options).generate(
        prompts(), sp, use_tqdm=False)
    tolerance = 0.1 if options else 1e-3
    for a, b in zip(plain, ours):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=tolerance)
        assert [list(d) for d in a.prompt_logprobs[1:]] == [list(d) for d in b.prompt_logprobs[1:]]


def test_seeded_sampling_is_reproducible(ckpts):
    sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5,
                        max_tokens=24, seed=7, ignore_eos=True)
    runs = [token_ids(LLM(ckpts["v3-mtp"], max_model_len=200, speculative_config=spec(2)), prompts()[:3], sp)
            for _ in range(2)]
    assert runs[0] == runs[1] and all(len(t) == 24 for t in runs[0])


def test_builtin_model_greedy_is_the_same_and_accepts(ckpts):
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ps = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):"]
    want = token_ids(LLM(max_model_len=256), ps, sp)
    for k in (1, 2, 3):
        llm = LLM(max_model_len=256, speculative_config=spec(k))
        assert token_ids(llm, ps, sp) == want
        if k == 3:
            assert [token_ids(llm, [p], sp)[0] for p in ps] == want
        assert_drained(llm)
        stats = llm.engine.stats()
        assert stats.spec_acceptance_rate[0] > 0.2 and stats.spec_mean_accepted_length > 1.2


def test_draft_reuses_the_step_inputs_and_drafts_the_same(ckpts, monkeypatch):
    """spec_share_steps: a greedy step's catch-up over all its positions reuses the step's fused-layer inputs
    (fewer decode_step calls) and drafts exactly what it drafts without (the same acceptance)."""
    from dsinfer.models import fused_decode
    calls, original = [], fused_decode.decode_step
    monkeypatch.setattr(fused_decode, "decode_step", lambda *a: calls.append(1) or original(*a))
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    counts, stats = [], []
    for share in (True, False):
        calls.clear()
        llm = LLM(max_model_len=256, speculative_config=spec(1), spec_share_steps=share)
        if llm.engine.runner.fused is None:
            pytest.skip("no fused decoder here (no C kernels)")
        token_ids(llm, ["def fibonacci(n):"], sp)
        counts.append(len(calls))
        stats.append(llm.engine.stats().spec_accepted_tokens)
    assert counts[0] < counts[1] and stats[0] == stats[1]


@pytest.mark.parametrize("value, message", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "mtp", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer in 1..8"),
    ({"method": "mtp"}, "num_speculative_tokens must be an integer"),
    ({"method": "mtp", "num_speculative_tokens": 2, "draft_model": "x"}, "unknown field.*draft_model"),
    ({"num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size must be a positive integer"),
    ({"num_speculative_tokens": 2, "disable_by_batch_size": "4"}, "disable_by_batch_size must be a positive"),
    ('{"method": "mtp", ', "not valid JSON"),
    (["mtp"], "must be a dict"),
])
def test_bad_speculative_config_is_a_clear_error(value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_kwargs(speculative_config=value)
    assert EngineConfig.from_kwargs(speculative_config='{"num_speculative_tokens": 3}').speculative_config == spec(3)


@pytest.mark.parametrize("options, bits", [(dict(), 8), (dict(enforce_eager=True), None),
                                           (dict(spec_draft_quantization=None), None),
                                           (dict(spec_draft_quantization="int4"), 4)], ids=str)
def test_draft_quantization_auto_is_int8_where_the_fused_kernels_draft(ckpts, options, bits):
    """spec_draft_quantization="auto" (the default): int8 where the fused C decode kernels run the draft, the
    model's own precision where they do not (enforce_eager, or no C kernels); explicit values as given."""
    llm = LLM(ckpts["v3-mtp"], max_model_len=200, speculative_config=spec(1), **options)
    fused = llm.engine.model.kernel_config.fused_decode
    if bits == 8 and not fused:
        bits = None  # no C kernels on this machine: auto stays in the model's precision
    head = llm.engine.spec.mtp.draft_head
    assert (None if head is None else head.bits) == bits


def test_disable_by_batch_size_pauses_drafting(ckpts, reference):
    """disable_by_batch_size: while more sequences run than it allows, nothing is drafted; outputs unchanged, and
    drafting resumes when the batch shrinks (here: the longest request left alone for its last 12 tokens)."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 12, 24)]
    drafts = []
    for limit in (2, 1, None):
        config = spec(1) | ({} if limit is None else {"disable_by_batch_size": limit})
        llm = LLM(ckpts["v3-mtp"], max_model_len=200, speculative_config=config)
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts()[:3], params, use_tqdm=False)]
        assert outs == [r[:p.max_tokens] for r, p in zip(reference, params)]
        assert_drained(llm)
        drafts.append(llm.engine.stats().spec_draft_tokens[0])
    assert 0 < drafts[1] < drafts[0] < drafts[2]  # two running: drafts; one: only alone; no limit: always


def mtp_rows(llm, prompt: list[int], paused: bool) -> torch.Tensor:
    """The MTP layer's cache rows at a greedy sequence's positions, with drafting paused at every step or not."""
    e = llm.engine
    e.spec.paused = lambda: paused
    e.add_request("r", None, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    table = []
    while e.has_unfinished():
        table = list(e.scheduler.running[0].block_table) if e.scheduler.running else table
        e.step()
    positions = torch.arange(len(prompt) + 10)  # caught up: every position but the last two
    slots = torch.tensor(table)[positions // e.cfg.block_size] * e.cfg.block_size + positions % e.cfg.block_size
    return e.cache.layers[-1][slots].float()


@pytest.mark.parametrize("options", [dict(), dict(spec_draft_one_call=False), dict(enforce_eager=True)], ids=str)
def test_paused_drafting_still_writes_the_draft_cache(ckpts, options):
    """While drafting is paused the MTP layer still writes its cache row at every position (its attention half),
    the rows a drafting run writes, so drafts resume from a whole cache."""
    prompt = random_prompts((9,))[0]
    llm = LLM(ckpts["v3-mtp"], max_model_len=200, speculative_config=spec(1) | {"disable_by_batch_size": 1},
              **options)
    paused = mtp_rows(llm, prompt, True)
    assert llm.engine.stats().spec_draft_tokens == [0] and bool((paused != 0).any(dim=1).all())
    drafting = LLM(ckpts["v3-mtp"], max_model_len=200, speculative_config=spec(1), **options)
    torch.testing.assert_close(paused, mtp_rows(drafting, prompt, False), rtol=1e-3, atol=1e-3)
