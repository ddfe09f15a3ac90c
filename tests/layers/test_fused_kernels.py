"""The fused elementwise kernels (RMSNorm, MLA's rope + cache write) against the torch paths they replace."""
import pytest
import torch
import torch.nn.functional as F

from dsinfer import kernels
from dsinfer.config import ModelConfig
from dsinfer.kernels import KernelConfig
from dsinfer.layers.attention import MLA
from dsinfer.layers.norm import RMSNorm

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")
CFG = dict(model_type="deepseek_v3", vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=3,
           kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=8, q_lora_rank=16, intermediate_size=8)


@pytest.mark.parametrize("n", [1, 7, 8, 64, 83])
def test_rms_norm_equals_torch_on_strided_rows(n):
    x = torch.randn(5, n + 9)[:, :n] * 4  # rows n + 9 apart, as a slice of a wider projection
    w = torch.randn(n)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), F.rms_norm(x, (n,), w, 1e-6))


def test_norm_module_takes_the_kernel_only_when_switched_on(monkeypatch):
    calls, real = [], kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append(1) or real(*a))
    norm, plain = RMSNorm(40, kc=KernelConfig()), RMSNorm(40)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 40)
    on = norm(x)
    assert calls == [1]
    plain.weight.data.copy_(norm.weight.data)
    torch.testing.assert_close(on, plain(x))
    assert calls == [1]


def mla_inputs(t: int, seed: int, cpu_kernels: bool = True):
    g = torch.Generator().manual_seed(seed)
    mla = MLA(ModelConfig.from_dict(CFG), kc=KernelConfig(cpu_kernels=cpu_kernels))
    torch.nn.init.normal_(mla.kv_a_layernorm.weight, generator=g)
    q = torch.randn(t, 3, 18, generator=g)
    kv = torch.randn(t, 26, generator=g)
    slots = torch.randperm(40, generator=g)[:t]
    return mla, q, kv, mla.rotary.rotation(torch.randint(0, 500, (t,), generator=g)), slots


@pytest.mark.parametrize("t", [1, 5, 33])
def test_rope_and_cache_write_equal_the_torch_path(t, monkeypatch):
    caches, parts = [], []
    for on in (True, False):
        mla, q, kv, cis, slots = mla_inputs(t, seed=t, cpu_kernels=on)
        cache = torch.zeros(40, 26)
        parts.append([p.clone() for p in mla.rope_and_cache(q.clone(), kv, cis, cache, slots)])
        caches.append(cache)
    torch.testing.assert_close(caches[0], caches[1])
    for a, b in zip(*parts):
        torch.testing.assert_close(a, b)


def test_a_slot_outside_the_cache_is_named():
    mla, q, kv, cis, slots = mla_inputs(2, seed=0)
    with pytest.raises(ValueError, match="outside the cache's 40 rows"):
        kernels.mla_rope_cache(q, kv, mla.kv_a_layernorm.weight, 1e-6, cis, torch.zeros(40, 26), slots + 40, 12)
    with pytest.raises(ValueError, match="do not fit together"):
        kernels.mla_rope_cache(q, kv, mla.kv_a_layernorm.weight, 1e-6, cis, torch.zeros(40, 20), slots, 12)


@pytest.mark.parametrize("h,dn,dr,dv,r", [(4, 32, 16, 32, 64), (3, 12, 6, 8, 20), (16, 128, 64, 128, 512)])
def test_absorb_and_expand_equal_the_batched_matmuls_and_do_not_depend_on_the_batch(h, dn, dr, dv, r):
    g = torch.Generator().manual_seed(h + r)
    q = torch.randn(5, h, dn + dr, generator=g)
    q_nope, q_pe = q[..., :dn], q[..., dn:]  # views of one query, as MLA makes them
    kv_b = torch.randn(h * (dn + dv), r, generator=g)
    w = kv_b.view(h, dn + dv, r)
    qc = kernels.mla_absorb(q_nope, q_pe, kv_b, r, dv)
    want = torch.cat([torch.bmm(q_nope.transpose(0, 1), w[:, :dn]).transpose(0, 1), q_pe], -1)
    torch.testing.assert_close(qc, want, rtol=1e-5, atol=1e-4)
    o_lat = torch.randn(5, h, r, generator=g)
    out = kernels.mla_expand(o_lat, kv_b, dn, dv)
    torch.testing.assert_close(out, torch.bmm(o_lat.transpose(0, 1), w[:, dn:].transpose(1, 2)).transpose(0, 1),
                               rtol=1e-5, atol=1e-4)
    for i in range(5):  # each token alone gives the same bits as in the batch
        assert torch.equal(kernels.mla_absorb(q_nope[i:i + 1], q_pe[i:i + 1], kv_b, r, dv)[0], qc[i])
        assert torch.equal(kernels.mla_expand(o_lat[i:i + 1], kv_b, dn, dv)[0], out[i])


def test_absorb_refuses_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        kernels.mla_absorb(torch.randn(2, 4, 8), torch.randn(2, 4, 4), torch.randn(4 * 15, 16), 16, 8)
