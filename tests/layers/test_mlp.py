"""The MLP run in token chunks (bounded activation memory) against one pass over all tokens."""
import pytest
import torch

from dsinfer import LLM, SamplingParams
from dsinfer.layers import mlp
from tests.conftest import random_prompts


@pytest.fixture
def restore_chunk():
    before = mlp._chunk["tokens"]
    yield
    mlp.set_chunk_tokens(before)


def test_chunks_give_the_same_output(restore_chunk, monkeypatch):
    from dsinfer import kernels
    monkeypatch.setitem(kernels._state, "moe_prefill", False)  # that kernel bounds its activations by itself
    m = mlp.MLP(16, 24)
    torch.nn.init.normal_(m.gate_up_proj)
    torch.nn.init.normal_(m.down_proj)
    x = torch.randn(37, 16)
    mlp.set_chunk_tokens(None)
    want = m(x)
    for step in (1, 5, 36, 37, 100):
        mlp.set_chunk_tokens(step)
        torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4)  # chunks of <= 8 rows take the CPU kernel


def test_bad_chunk_size_is_refused(restore_chunk):
    with pytest.raises(ValueError, match="ffn_chunk_tokens"):
        mlp.set_chunk_tokens(-1)


def test_generation_is_the_same_with_chunked_mlps(ckpts, restore_chunk):
    prompts = [{"prompt_token_ids": p} for p in random_prompts([9, 30])]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = [LLM(ckpts["v3"], ffn_chunk_tokens=n).generate(prompts, sp, use_tqdm=False) for n in (None, 4)]
    assert [o.outputs[0].token_ids for o in outs[0]] == [o.outputs[0].token_ids for o in outs[1]]


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_decode_batches_through_the_experts_kernel_equal_the_torch_path(tokens, monkeypatch):
    from dsinfer import kernels
    m = mlp.MLP(16, 24)
    torch.nn.init.normal_(m.gate_up_proj)
    torch.nn.init.normal_(m.down_proj)
    x = torch.randn(tokens, 16)
    fused = m(x)
    monkeypatch.setitem(kernels._state, "enabled", False)
    torch.testing.assert_close(fused, m(x), rtol=1e-5, atol=1e-5)
