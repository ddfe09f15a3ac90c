"""The fused decode layer in halves (kernels/decode_layer.c: decode_attention_f32, decode_ffn_f32), as the ranks
of a tensor-parallel group run it (models/parallel_fused.py), in one process against the whole layer: attention,
then the MoE as the sum of parts holding some of the experts each (expert parallelism, the router over all of
them), with the residual added once. One part holds a single expert, so that most tokens have none of theirs
there and the others pad with weight-0 pairs."""
import ctypes

import pytest
import torch

from dsinfer import LLM, SamplingParams, kernels
from dsinfer.kernels.decode_layer import LayerC, MatC, run_attention, run_ffn
from dsinfer.models import fused_decode
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")


def expert_parts(layer: LayerC) -> list[LayerC]:
    """fp32 layer: copies holding experts [0, 1), [1, E / 2), [E / 2, E), the shared experts in the first only."""
    if not layer.experts:
        return [layer]
    e, d, inter = layer.experts, layer.d, layer.inter
    parts = []
    for first, stop in ((0, 1), (1, e // 2), (e // 2, e)):
        part = LayerC.from_buffer_copy(layer)
        part.first_expert, part.local_experts = first, stop - first
        part.gate_up.w = layer.gate_up.w + 4 * first * 2 * inter * d
        part.down.w = layer.down.w + 4 * first * d * inter
        if first:
            part.sh_gate_up, part.sh_down = MatC(), MatC()
        parts.append(part)
    return parts


def run_in_halves(lib, layer, step, x_ptr, cache_ptr, threads) -> int:
    """run_layer's contract by the halves: x += attention(x); x += the sum of the parts' ffn(x)."""
    x = torch.frombuffer((ctypes.c_float * (step.t * layer.d)).from_address(x_ptr), dtype=torch.float32)
    out, total = torch.empty_like(x), torch.zeros_like(x)
    code = run_attention(lib, layer, step, x_ptr, cache_ptr, out.data_ptr(), threads)
    x += out
    for part in expert_parts(layer):
        code = code or run_ffn(lib, part, step, x_ptr, out.data_ptr(), threads)
        total += out
    x += total
    return code


def generate(llm):
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in random_prompts([5, 17, 40, 9, 3, 30, 12, 21])], sp,
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                                      o.outputs[0].token_ids)]
                                                     for o in outs]


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_halves_and_expert_parts_add_up_to_the_whole_layer(name, ckpts, monkeypatch):
    llm = LLM(ckpts[name])
    assert llm.engine.runner.fused is not None
    want = generate(llm)
    calls = []
    monkeypatch.setattr(fused_decode, "run_layer", lambda *a: calls.append(1) or run_in_halves(*a))
    got = generate(llm)
    assert calls
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1]):
        assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4, rtol=0)


def test_bad_expert_slices_are_refused(ckpts):
    llm = LLM(ckpts["v3"])
    layer = LayerC.from_buffer_copy(llm.engine.runner.fused.layers[-1])
    layer.first_expert, layer.local_experts = 1, layer.experts  # past the last expert
    out = torch.zeros(layer.d)
    assert run_ffn(kernels.library(), layer, fused_decode.StepC(t=1), out.data_ptr(), out.data_ptr(), 1) == 1
