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


def test_prefill_is_the_same_with_the_torch_attention(ckpts):
    from dsinfer import LLM, SamplingParams
    from tests.conftest import random_prompts
    prompts = [{"prompt_token_ids": p} for p in random_prompts([150, 20])]
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    llm = LLM(ckpts["v2-lite"], max_num_batched_tokens=64)  # chunks: queries after a cached part too
    blocked = llm.generate(prompts, sp, use_tqdm=False)
    llm = LLM(ckpts["v2-lite"], max_num_batched_tokens=64, cpu_kernels=False)
    plain = llm.generate(prompts, sp, use_tqdm=False)
    for a, b in zip(blocked, plain):
        la = [next(iter(d.values())).logprob for d in a.prompt_logprobs[1:]]
        lb = [next(iter(d.values())).logprob for d in b.prompt_logprobs[1:]]
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=1e-4)
