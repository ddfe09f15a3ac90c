"""Prefill attention in causal query blocks (CPU, fp32) against torch's scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F

from dsinfer.layers.attention import _causal_mask, causal_blocks


@pytest.mark.parametrize("ql,cl", [(1, 1), (7, 7), (128, 128), (300, 300), (5, 40), (200, 333), (1, 9)])
@pytest.mark.parametrize("block", [1, 64, 128])
def test_blocks_equal_sdpa(ql, cl, block):
    g = torch.Generator().manual_seed(ql * 1000 + cl)
    q, k = torch.randn(4, ql, 24, generator=g), torch.randn(4, cl, 24, generator=g)
    v = torch.randn(4, cl, 16, generator=g)
    mask = None if ql == cl else _causal_mask(ql, cl, q.device)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and ql > 1, scale=0.3)
    torch.testing.assert_close(causal_blocks(q, k, v, 0.3, block), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.02)])
def test_prefill_is_the_same_with_the_torch_attention(ckpts, dtype, tol):
    """bf16: the blocks run in fp32 as SDPA does; the other ops of the two paths round differently."""
    from dsinfer import LLM, SamplingParams
    from tests.conftest import random_prompts
    prompts = [{"prompt_token_ids": p} for p in random_prompts([150, 20])]
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    llm = LLM(ckpts["v2-lite"], max_num_batched_tokens=64, dtype=dtype)  # chunks: queries after a cached part too
    blocked = llm.generate(prompts, sp, use_tqdm=False)
    llm = LLM(ckpts["v2-lite"], max_num_batched_tokens=64, cpu_kernels=False, dtype=dtype)
    plain = llm.generate(prompts, sp, use_tqdm=False)
    for a, b in zip(blocked, plain):
        la = [next(iter(d.values())).logprob for d in a.prompt_logprobs[1:]]
        lb = [next(iter(d.values())).logprob for d in b.prompt_logprobs[1:]]
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=tol, atol=tol)


def test_bf16_blocks_in_fp32_are_as_close_as_sdpa():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 200, d, generator=g).bfloat16() for d in (24, 24, 16))
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=0.3)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3).float()
    ours = causal_blocks(q.float(), k.float(), v.float(), 0.3).bfloat16().float()
    assert (ours - exact).abs().max() <= (sdpa - exact).abs().max() + 1e-6
