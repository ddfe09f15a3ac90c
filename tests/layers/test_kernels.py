"""dsinfer's CPU weight-streaming kernel against torch's matmul (the plain path it replaces)."""
import pytest
import torch
import torch.nn.functional as F

from dsinfer import LLM, SamplingParams, kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers.linear import Matmul
from dsinfer.layers.moe import Experts
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernel cannot be built on this machine")


@pytest.mark.parametrize("m", range(1, kernels.MAX_M + 1))
@pytest.mark.parametrize("n,k", [(1, 1), (7, 5), (33, 40), (64, 100), (130, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_equals_torch(m, n, k, dtype):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).to(dtype)
    torch.testing.assert_close(kernels.gemv(x, w), F.linear(x, w.float()), rtol=1e-5, atol=1e-5 + 1e-6 * k)  # fp32 sum order


@pytest.mark.parametrize("k", [40, 100, 2048 + 8 + 3])  # whole cache lines of a row, 8-column pieces, a tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_rows_do_not_depend_on_the_batch(k, dtype):
    """Each row of x gives the same bits alone as with up to MAX_M rows (the row kernels for 1 and 2 rows and
    the blocked one for more sum every output in one order), which greedy speculative decoding relies on."""
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(kernels.MAX_M, k, generator=g), torch.randn(37, k, generator=g).to(dtype)
    alone = torch.cat([kernels.gemv(x[i:i + 1], w) for i in range(kernels.MAX_M)])
    for m in range(2, kernels.MAX_M + 1):
        assert torch.equal(kernels.gemv(x[:m], w), alone[:m]), f"{m} rows"


@pytest.mark.parametrize("n", [37, 38, 39])  # a last group of 1, 2 or 3 weight rows
@pytest.mark.parametrize("k", [40, 2048 + 8 + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_of_9_to_16_rows_gives_the_bits_of_passes_of_8(n, k, dtype):
    """The C entry takes up to WIDE_M rows in one pass over the weights (a fused step's 9-16 tokens): every row
    gets the bits that passes of at most MAX_M rows give it."""
    g = torch.Generator().manual_seed(n + k)
    x, w = torch.randn(kernels.WIDE_M, k, generator=g), torch.randn(n, k, generator=g).to(dtype)
    for m in range(kernels.MAX_M + 1, kernels.WIDE_M + 1):
        passes = torch.cat([kernels.gemv(x[:kernels.MAX_M], w), kernels.gemv(x[kernels.MAX_M:m], w)])
        assert torch.equal(kernels.gemv(x[:m], w), passes), f"{m} rows"


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k", [100, 256])
def test_bf16_rows_that_prefetch_sum_like_the_last_rows(m, k):
    """The bf16 row kernel prefetches the next rows while it reads a block, except near the matrix's end: both
    must sum each row in the same order (same bits for the same row)."""
    g = torch.Generator().manual_seed(k + m)
    x, row = torch.randn(m, k, generator=g), torch.randn(1, k, generator=g).bfloat16()
    y = kernels.gemv(x, row.expand(64, k).contiguous())
    assert torch.equal(y, y[:, :1].expand_as(y))


def test_only_decode_sized_fp32_cpu_inputs_take_the_kernel():
    w = torch.randn(16, 32)
    assert kernels.usable(torch.randn(kernels.MAX_M, 32), w)
    assert not kernels.usable(torch.randn(kernels.MAX_M + 1, 32), w)
    assert not kernels.usable(torch.randn(2, 32, dtype=torch.bfloat16), w)
    assert not kernels.usable(torch.randn(2, 32), w.t())  # not contiguous


def test_switch_off_gives_the_plain_path(monkeypatch):
    x, w = torch.randn(2, 32), torch.randn(16, 32)
    calls = []
    gemv = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a: calls.append(1) or gemv(*a))
    torch.testing.assert_close(Matmul(KernelConfig(cpu_kernels=False))(x, w), F.linear(x, w))
    assert calls == []
    torch.testing.assert_close(Matmul(KernelConfig())(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert calls == [1]


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_generation_is_the_same_with_and_without_the_kernel(name, ckpts):
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 17, 40])]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    results = []
    for on in (True, False):
        llm = LLM(ckpts[name], cpu_kernels=on)
        results.append(llm.generate(prompts, sp, use_tqdm=False))
    for a, b in zip(*results):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)


def test_16_bit_decode_rows_take_the_kernel_widened(monkeypatch):
    """A bf16 model's decode rows go through the fp32-activation kernels (x widened, the result rounded back),
    not torch's bf16 matmul of a few rows, and agree with it to bf16 precision."""
    calls, gemv, moe = [], kernels.gemv, kernels.moe_decode
    monkeypatch.setattr(kernels, "gemv", lambda *a: calls.append("gemv") or gemv(*a))
    monkeypatch.setattr(kernels, "moe_decode", lambda *a: calls.append("moe") or moe(*a))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=g).bfloat16(), torch.randn(40, 64, generator=g).bfloat16()
    y = Matmul(KernelConfig())(x, w)
    assert y.dtype == torch.bfloat16 and calls == ["gemv"]
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)
    ex = Experts(4, 64, 16, KernelConfig()).bfloat16()
    torch.nn.init.normal_(ex.gate_up_proj, generator=g)
    torch.nn.init.normal_(ex.down_proj, generator=g)
    ids, weights = torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2, generator=g)
    out = ex(x, weights, ids)
    assert out.dtype == torch.bfloat16 and calls[-1] == "moe"
    torch.testing.assert_close(out.float(), ex.grouped(x.float(), weights, ids).float(), rtol=2e-2, atol=2e-1)
    before = len(calls)
    assert Matmul(KernelConfig(cpu_kernels=False))(x, w).dtype == torch.bfloat16 and len(calls) == before
