"""The fused decode layer on the ranks of a tensor-parallel group (models/parallel_fused.py) against the Python
layers of the same group (enforce_eager): the same greedy tokens, and each generated token's logprob within 1e-4
(fp32), under tensor and expert parallelism, with a quantized model too."""
import pytest
import torch

from dsinfer import LLM, SamplingParams
from dsinfer.models.parallel_fused import ParallelFusedDecoder
from tests.conftest import random_prompts

PROMPTS = random_prompts([5, 23, 9, 17, 3], seed=3)
DECODE = SamplingParams(temperature=0, max_tokens=8, logprobs=0, ignore_eos=True)
ENGINE = dict(max_num_batched_tokens=32)


def decoded(llm) -> tuple[list, list]:
    """(greedy tokens, each generated token's logprob) per prompt."""
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], DECODE, use_tqdm=False)
    return ([o.outputs[0].token_ids for o in outs],
            [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs])


@pytest.mark.parametrize("name,options", [
    ("v2-lite", dict()),
    ("v3", dict(enable_expert_parallel=True)),
    ("v2-lite", dict(quantization="int4", enable_expert_parallel=True)),
], ids=["v2-lite-tp", "v3-ep", "v2-lite-int4-ep"])
def test_fused_decode_on_ranks_matches_the_python_layers(ckpts, name, options, monkeypatch):
    with LLM(ckpts[name], tensor_parallel_size=2, enforce_eager=True, **ENGINE, **options) as eager:
        assert eager.model.fused is None
        want = decoded(eager)
    calls, call = [], ParallelFusedDecoder.__call__
    monkeypatch.setattr(ParallelFusedDecoder, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
    with LLM(ckpts[name], tensor_parallel_size=2, **ENGINE, **options) as fused:
        assert fused.model.fused is not None
        got = decoded(fused)
    assert len(calls) >= DECODE.max_tokens - 1  # rank 0's decode steps took it (the others follow it)
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1]):
        assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4, rtol=0)
