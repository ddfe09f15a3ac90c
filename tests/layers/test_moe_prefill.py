"""dsinfer's prefill MLP kernel (moe_prefill_avx2.c) against the torch path: Experts.grouped for routed experts,
MLP.run for a dense MLP."""
import pytest
import torch

from dsinfer import kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers.mlp import MLP
from dsinfer.layers.moe import Experts

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")


def experts(e, d, inter, seed, kc=KernelConfig()):
    torch.manual_seed(seed)
    ex = Experts(e, d, inter, kc)
    torch.nn.init.normal_(ex.gate_up_proj, std=d ** -0.5)
    torch.nn.init.normal_(ex.down_proj, std=inter ** -0.5)
    return ex


def routing(t, e, k, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    if skew:  # uneven loads: most tokens on the first experts, as a real router gives
        scores = torch.rand(t, e, generator=g) * torch.linspace(3, 0.1, e)
        ids = scores.topk(k, dim=-1).indices
    else:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    return ids, torch.rand(t, k, generator=g)


# token counts that give every panel shape: full panels of 16, and tails of 1-8 rows (one vector) and 9-15
# (two); widths where I is not a multiple of 3 and D not of 6 exercise the tiles' edge rows
@pytest.mark.parametrize("t", [9, 16, 17, 25, 40, 300])
@pytest.mark.parametrize("e,d,inter,k", [(8, 64, 40, 2), (4, 37, 19, 3), (16, 130, 88, 6), (1, 48, 30, 1)])
def test_routed_experts_equal_the_torch_path(t, e, d, inter, k):
    ex = experts(e, d, inter, seed=t + d)
    x = torch.randn(t, d)
    ids, weights = routing(t, e, k, seed=t * 7 + e)
    got = kernels.moe_prefill(x, ids, weights, ex.gate_up_proj.data, ex.down_proj.data)
    torch.testing.assert_close(got, ex.grouped(x, weights, ids), rtol=1e-5, atol=1e-5)


def test_uneven_loads_and_blocks_of_more_than_256_tokens():
    ex = experts(4, 64, 24, seed=3)
    x = torch.randn(700, 64)
    ids, weights = routing(700, 4, 2, seed=5, skew=True)
    assert torch.bincount(ids.flatten()).max() > 256  # one expert runs in several blocks
    got = kernels.moe_prefill(x, ids, weights, ex.gate_up_proj.data, ex.down_proj.data)
    torch.testing.assert_close(got, ex.grouped(x, weights, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [9, 24, 257, 600])
def test_dense_mlp_equals_the_torch_path(t):
    torch.manual_seed(t)
    m = MLP(40, 33, KernelConfig())
    torch.nn.init.normal_(m.gate_up_proj, std=0.2)
    torch.nn.init.normal_(m.down_proj, std=0.2)
    x = torch.randn(t, 40)
    assert kernels.moe_prefill_usable(x, m.gate_up_proj[None])
    torch.testing.assert_close(m(x), m.run(x), rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_threads_or_on_the_other_tokens():
    ex = experts(8, 64, 40, seed=1)
    x = torch.randn(50, 64)
    ids, weights = routing(50, 8, 3, seed=2)
    args = (ex.gate_up_proj.data, ex.down_proj.data)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(kernels.moe_prefill(x, ids, weights, *args))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    alone = kernels.moe_prefill(x[:20], ids[:20], weights[:20], *args)  # other tokens share the panels
    assert torch.equal(alone, results[0][:20])


def test_silu_of_large_values_stays_finite():
    ex = experts(2, 16, 8, seed=4)
    x = torch.randn(12, 16) * 1e3  # gate pre-activations far beyond exp's range
    ids, weights = routing(12, 2, 1, seed=6)
    got = kernels.moe_prefill(x, ids, weights, ex.gate_up_proj.data, ex.down_proj.data)
    assert torch.isfinite(got).all()
    want = ex.grouped(x, weights, ids)  # sums of values in the thousands: compare relative to their size
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("bad", [-1, 8])
def test_bad_expert_id_is_an_error(bad):
    ex = experts(8, 16, 8, seed=5)
    ids, weights = routing(10, 8, 2, seed=1)
    ids[3, 1] = bad
    with pytest.raises(ValueError, match="expert id out of range"):
        kernels.moe_prefill(torch.randn(10, 16), ids, weights, ex.gate_up_proj.data, ex.down_proj.data)


def test_bad_inputs_are_errors():
    ex = experts(4, 16, 8, seed=6)
    gu, dn = ex.gate_up_proj.data, ex.down_proj.data
    x = torch.randn(10, 16)
    ids, weights = routing(10, 4, 2, seed=3)
    with pytest.raises(ValueError, match="x must be fp32"):
        kernels.moe_prefill(x.double(), ids, weights, gu, dn)
    with pytest.raises(ValueError, match="gate_up must be a plain fp32"):
        kernels.moe_prefill(x, ids, weights, gu.bfloat16(), dn)
    with pytest.raises(ValueError, match="gate_up must be"):
        kernels.moe_prefill(x, ids, weights, gu[:, :, :8], dn)
    with pytest.raises(ValueError, match="down must be"):
        kernels.moe_prefill(x, ids, weights, gu, dn[:, :, :4])
    with pytest.raises(ValueError, match="ids must be int64"):
        kernels.moe_prefill(x, ids.int(), weights, gu, dn)
    with pytest.raises(ValueError, match="weights must be fp32"):
        kernels.moe_prefill(x, ids, weights[:, :1], gu, dn)
    assert not kernels.moe_prefill_usable(torch.randn(kernels.MAX_M, 16), gu)  # decode sizes: not this kernel
    assert not kernels.moe_prefill_usable(x, gu.transpose(1, 2))


@pytest.mark.parametrize("switch", ["moe_prefill", "cpu_kernels"])
def test_switch_sends_layers_to_the_torch_path(switch, monkeypatch):
    calls, real = [], kernels.moe_prefill
    monkeypatch.setattr(kernels, "moe_prefill", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(30, 32)
    ids, weights = routing(30, 8, 2, seed=4)
    on, off = experts(8, 32, 16, seed=7), experts(8, 32, 16, seed=7, kc=KernelConfig(**{switch: False}))
    torch.testing.assert_close(on(x, weights, ids), off(x, weights, ids), rtol=1e-5, atol=1e-5)
    assert calls == [1]
    assert torch.equal(off(x, weights, ids), off.grouped(x, weights, ids))
    assert calls == [1]
