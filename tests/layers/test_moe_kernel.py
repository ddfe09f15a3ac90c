"""dsinfer's fused routed-experts decode kernel against a plain torch loop over tokens and their choices."""
import pytest
import torch
import torch.nn.functional as F

from dsinfer import kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers.moe import Experts

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")


def reference(x, ids, weights, gate_up, down):
    gate_up, down, inter = gate_up.float(), down.float(), down.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = F.linear(x[t], gate_up[e])
            out[t] += weights[t, j] * F.linear(F.silu(gu[:inter]) * gu[inter:], down[e])
    return out


def make(e, d, inter, k, t, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    gate_up = (torch.randn(e, 2 * inter, d, generator=g) * d ** -0.5).to(dtype)
    down = (torch.randn(e, d, inter, generator=g) * inter ** -0.5).to(dtype)
    # each token's k distinct experts from the first e - 1 (the last one is used by nobody when e > k), so that
    # with T > 1 tokens share experts
    pool = max(e - 1, k)
    ids = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    return x, ids, weights, gate_up, down


@pytest.mark.parametrize("t", [1, 2, 5, 8])
@pytest.mark.parametrize("e,d,inter,k", [(8, 256, 224, 2), (4, 16, 8, 1), (6, 37, 19, 3), (64, 128, 96, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_decode_equals_torch(t, e, d, inter, k, dtype):
    x, ids, weights, gate_up, down = make(e, d, inter, k, t, dtype, seed=t * 100 + e + d + k)
    assert kernels.moe_usable(x, gate_up)
    got = kernels.moe_decode(x, ids, weights, gate_up, down)
    torch.testing.assert_close(got, reference(x, ids, weights, gate_up, down), rtol=1e-5, atol=1e-5 + 1e-6 * d)


def test_all_tokens_on_the_same_experts_and_threads_do_not_change_the_result():
    x, _, weights, gate_up, down = make(8, 64, 40, 3, 8, torch.float32, seed=1)
    ids = torch.tensor([[5, 2, 0]] * 8)
    want = reference(x, ids, weights, gate_up, down)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, threads, 3):
            torch.set_num_threads(n)
            results.append(kernels.moe_decode(x, ids, weights, gate_up, down))
    finally:
        torch.set_num_threads(threads)
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(kernels.moe_decode(x, ids, weights, gate_up, down), results[1])  # same threads: same bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_gives_the_same_bits_alone_and_batched(dtype):
    """Each token's output is summed in one order whatever else is in the batch (its experts run for 1..MAX_M
    tokens, by the row kernels with 8, 6, ... weight rows side by side or the blocked one, each block prefetching
    the next rows or the next expert's): greedy speculative decoding relies on it."""
    x, ids, weights, gate_up, down = make(24, 136, 72, 6, kernels.MAX_M, dtype, seed=7)
    g = torch.Generator().manual_seed(8)  # experts 0 and 1 shared by every token, beside ones used by fewer
    ids = torch.stack([torch.cat([torch.arange(2), 2 + torch.randperm(22, generator=g)[:4]]) for _ in ids])
    alone = torch.cat([kernels.moe_decode(x[i:i + 1], ids[i:i + 1], weights[i:i + 1], gate_up, down)
                       for i in range(kernels.MAX_M)])
    for t in range(2, kernels.MAX_M + 1):
        assert torch.equal(kernels.moe_decode(x[:t], ids[:t], weights[:t], gate_up, down), alone[:t]), f"{t} tokens"


@pytest.mark.parametrize("bad", [-1, 8])
def test_bad_expert_id_is_an_error(bad):
    x, ids, weights, gate_up, down = make(8, 16, 8, 2, 2, torch.float32, seed=2)
    ids[1, 0] = bad
    with pytest.raises(ValueError, match="expert id out of range"):
        kernels.moe_decode(x, ids, weights, gate_up, down)


def test_bad_inputs_are_errors():
    x, ids, weights, gate_up, down = make(4, 16, 8, 2, 2, torch.float32, seed=3)
    big = torch.randn(kernels.MAX_M + 1, 16)
    with pytest.raises(ValueError, match="x must be fp32"):
        kernels.moe_decode(big, ids.repeat(5, 1)[:kernels.MAX_M + 1], weights.repeat(5, 1)[:kernels.MAX_M + 1],
                           gate_up, down)
    with pytest.raises(ValueError, match="x must be fp32"):
        kernels.moe_decode(x.double(), ids, weights, gate_up, down)
    with pytest.raises(ValueError, match="both fp32 or both bf16"):
        kernels.moe_decode(x, ids, weights, gate_up, down.bfloat16())
    with pytest.raises(ValueError, match="both fp32 or both bf16"):
        kernels.moe_decode(x, ids, weights, gate_up.half(), down.half())
    with pytest.raises(ValueError, match="ids must be int64"):
        kernels.moe_decode(x, ids.int(), weights, gate_up, down)
    with pytest.raises(ValueError, match="weights must be fp32"):
        kernels.moe_decode(x, ids, weights[:, :1], gate_up, down)
    with pytest.raises(ValueError, match="down must be"):
        kernels.moe_decode(x, ids, weights, gate_up, down[:, :, :4])
    assert not kernels.moe_usable(big, gate_up)
    assert not kernels.moe_usable(x.bfloat16(), gate_up)
    assert not kernels.moe_usable(x, gate_up.transpose(1, 2))


def test_switch_off_is_respected(monkeypatch):
    calls, real = [], kernels.moe_decode
    monkeypatch.setattr(kernels, "moe_decode", lambda *a: calls.append(1) or real(*a))
    x, ids, weights = torch.randn(2, 16), torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2)
    on, off = Experts(4, 16, 8, KernelConfig()), Experts(4, 16, 8, KernelConfig(cpu_kernels=False))
    for ex in (on, off):
        torch.manual_seed(0)
        torch.nn.init.normal_(ex.gate_up_proj)
        torch.nn.init.normal_(ex.down_proj)
    torch.testing.assert_close(on(x, weights, ids), off(x, weights, ids), rtol=1e-5, atol=1e-5)
    assert calls == [1]
