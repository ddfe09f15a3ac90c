"""The MLP run in token chunks (bounded activation memory) against one pass over all tokens."""
import pytest
import torch

from dsinfer import LLM, SamplingParams, kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers import mlp
from tests.conftest import random_prompts


def chunked(step: int, like: mlp.MLP | None = None) -> mlp.MLP:
    """An MLP that runs its torch path in chunks of `step` tokens (0: all at once), with like's weights."""
    m = mlp.MLP(16, 24, KernelConfig(moe_prefill=False, ffn_chunk_tokens=step))  # that kernel bounds its own
    if like is None:
        torch.nn.init.normal_(m.gate_up_proj)
        torch.nn.init.normal_(m.down_proj)
    else:
        m.load_state_dict(like.state_dict())
    return m


def test_chunks_give_the_same_output():
    whole = chunked(0)
    x = torch.randn(37, 16)
    want = whole(x)
    for step in (1, 5, 36, 37, 100):
        torch.testing.assert_close(chunked(step, whole)(x), want, rtol=1e-4, atol=1e-4)  # <= 8 rows: CPU kernel


def test_bad_chunk_size_is_refused(ckpts):
    with pytest.raises(ValueError, match="ffn_chunk_tokens"):
        LLM(ckpts["v3"], ffn_chunk_tokens=-1)


def test_generation_is_the_same_with_chunked_mlps(ckpts):
    prompts = [{"prompt_token_ids": p} for p in random_prompts([9, 30])]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = [LLM(ckpts["v3"], ffn_chunk_tokens=n).generate(prompts, sp, use_tqdm=False) for n in (None, 4)]
    assert [o.outputs[0].token_ids for o in outs[0]] == [o.outputs[0].token_ids for o in outs[1]]


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_decode_batches_through_the_experts_kernel_equal_the_torch_path(tokens, monkeypatch):
    calls, real = [], kernels.mlp_decode
    monkeypatch.setattr(kernels, "mlp_decode", lambda *a: calls.append(1) or real(*a))
    m = mlp.MLP(16, 24, KernelConfig())
    torch.nn.init.normal_(m.gate_up_proj)
    torch.nn.init.normal_(m.down_proj)
    x = torch.randn(tokens, 16)
    fused = m(x)
    torch.testing.assert_close(fused, m.run(x), rtol=1e-5, atol=1e-5)
    assert calls == [1]
