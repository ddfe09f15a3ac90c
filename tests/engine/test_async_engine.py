import asyncio

import pytest

from dsinfer import SamplingParams
from dsinfer.engine.async_engine import AsyncLLM


@pytest.fixture(scope="module")
def async_llm(llms):
    engine = AsyncLLM(llms("v3", max_model_len=256))
    yield engine
    engine.shutdown()


def collect(async_llm, prompt, params):
    async def run():
        return [out async for out in async_llm.generate(prompt, params)]
    return run()


def test_concurrent_streams_match_offline_results(async_llm, llms):
    prompts = ["def f(x):", "import os", "class A:", "for i in"]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind="delta")
    expected = [o.outputs[0].text for o in llms("v3").generate(prompts, SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)]

    async def run():
        return await asyncio.gather(*(collect(async_llm, p, sp) for p in prompts))
    streams = asyncio.run(run())
    assert ["".join(o.outputs[0].text for o in s) for s in streams] == expected
    assert all(s[-1].finished and sum(len(o.outputs[0].token_ids) for o in s) == 12 for s in streams)


def test_leaving_a_stream_aborts_and_frees_blocks(async_llm):
    engine = async_llm.engine

    async def run():
        stream = async_llm.generate("def f(x):", SamplingParams(max_tokens=200, ignore_eos=True))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await stream.aclose()
    asyncio.run(run())
    assert async_llm.num_requests == 0 and not engine.has_unfinished() and engine.stats().kv_blocks_used == 0


def test_bad_prompt_raises_before_queueing(async_llm):
    async def run():
        return [o async for o in async_llm.generate({"prompt_token_ids": [10**9]}, SamplingParams())]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(run())
    assert async_llm.num_requests == 0


def test_a_failing_step_fails_only_its_requests(llms):
    """A step that raises fails the requests it ran; the ones still waiting are served."""
    async_llm = AsyncLLM(llms("v3", max_model_len=256, max_num_seqs=1))
    runner = async_llm.engine.runner
    run = runner.run

    def failing_run(batch, want):
        if any(s.request_id == "bad" for s, _ in batch):
            raise RuntimeError("boom")
        return run(batch, want)
    runner.run = failing_run
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, output_kind="delta")

    async def run_both():
        (bad, bad_q), (good, good_q) = async_llm.add_requests(["def f(x):", "import os"], sp, request_ids=["bad", "good"])

        async def outputs(rid, queue):
            return [o async for o in async_llm.stream(rid, queue)]
        return await asyncio.gather(outputs(bad, bad_q), outputs(good, good_q), return_exceptions=True)
    try:
        bad, good = asyncio.run(run_both())
    finally:
        del runner.run
        async_llm.shutdown()
    assert isinstance(bad, RuntimeError) and "boom" in str(bad)
    assert good[-1].finished and sum(len(o.outputs[0].token_ids) for o in good) == 4
