"""The elementwise C kernels of a bf16 prefill against the torch paths they replace: the SwiGLU activation
(KernelConfig.fused_swiglu: dense and shared MLPs, routed experts with their routing weights) and RMSNorm."""
import pytest
import torch
import torch.nn.functional as F

from dsinfer import kernels
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers import mlp
from dsinfer.layers.mlp import MLP, silu_and_mul
from dsinfer.layers.moe import Experts
from dsinfer.layers.norm import RMSNorm

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the C kernels could not be built here")
ON, OFF = KernelConfig(fused_swiglu=True), KernelConfig(fused_swiglu=False)


def exact(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    gate, up = x.float().chunk(2, -1)
    h = F.silu(gate) * up
    return h if scale is None else h * scale[:, None]


@pytest.mark.parametrize("t,inter,scaled", [(1, 8, False), (37, 13, True), (300, 1408, True), (5, 3, False)])
def test_equals_fp32_math_rounded_once(t, inter, scaled):
    """Vector bodies and scalar tails (inter % 8); with and without routing weights: the fp32 value rounded to bf16
    once, so within one bf16 rounding of the exact value (torch's bf16 path rounds three times)."""
    g = torch.Generator().manual_seed(t + inter)
    x = (3 * torch.randn(t, 2 * inter, generator=g)).bfloat16()
    scale = torch.rand(t, generator=g) if scaled else None
    got = kernels.silu_mul(x, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (t, inter)
    torch.testing.assert_close(got.float(), exact(x, scale), rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(got, silu_and_mul(x, scale), rtol=2 ** -5, atol=1e-3)  # four roundings there


def test_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="bf16"):
        kernels.silu_mul(torch.randn(4, 8))
    with pytest.raises(ValueError, match="bf16"):
        kernels.silu_mul(torch.randn(4, 7).bfloat16())
    with pytest.raises(ValueError, match="scale"):
        kernels.silu_mul(torch.randn(4, 8).bfloat16(), torch.rand(3))


def test_mlp_and_experts_bind_it_from_the_config(monkeypatch):
    """The switch decides at build time; off, the layers run torch's silu_and_mul and never the kernel."""
    calls = []
    monkeypatch.setattr(kernels, "silu_mul", lambda *a: calls.append(1) or silu_and_mul(*a))
    x = torch.randn(40, 64).bfloat16()
    for kc in (OFF, ON):
        MLP(64, 48, kc).to(torch.bfloat16).run(x)
    assert len(calls) == 1
    assert MLP(64, 48, ON).activation is mlp.fused_silu_and_mul and Experts(4, 64, 32, OFF).activation is silu_and_mul


@pytest.mark.parametrize("amx", [False, True])
def test_experts_fused_against_plain(amx):
    """A bf16 prefill's routed experts (one grouped product per matrix, on torch._grouped_mm or the AMX kernel)
    with the fused activation and routing weights, against the same layer with torch's."""
    if amx and not kernels.amx_ready():
        pytest.skip("needs AMX-BF16 tiles (amx_tile, amx_bf16)")
    g = torch.Generator().manual_seed(3)
    layers = []
    for kc in (ON, OFF):
        ex = Experts(8, 64, 48, KernelConfig(fused_swiglu=kc.fused_swiglu, amx_experts=amx).resolve("cpu"))
        torch.nn.init.normal_(ex.gate_up_proj, std=0.2, generator=g.manual_seed(4))
        torch.nn.init.normal_(ex.down_proj, std=0.2, generator=g.manual_seed(5))
        layers.append(ex.to(torch.bfloat16))
    x = torch.randn(70, 64, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(70)])
    weights = torch.rand(70, 2, generator=g)
    fused, plain = (ex(x, weights, ids) for ex in layers)
    assert fused.abs().max() > 0.1  # the tokens reached their experts
    assert (fused.float() - plain.float()).norm() < 0.01 * plain.float().norm()  # bf16 roundings apart, no more


@pytest.mark.parametrize("rows,n,strided", [(700, 2048, False), (3, 13, False), (50, 512, True)])
def test_rms_norm_bf16_as_transformers_computes_it(rows, n, strided):
    """Vector bodies and tails, strided rows (a slice of a wider tensor): the same two roundings as the torch path;
    the sum of squares is added in another order, so a last-bit difference in a few values is allowed."""
    g = torch.Generator().manual_seed(n)
    norms = [RMSNorm(n, 1e-6, kc).to(torch.bfloat16) for kc in (KernelConfig(), PLAIN)]
    for norm in norms:
        norm.weight.data.copy_(torch.randn(n, generator=g.manual_seed(1)))
    x = (5 * torch.randn(rows, 2 * n if strided else n, generator=g)).bfloat16()[:, :n]
    fused, plain = (norm(x) for norm in norms)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, rtol=2 ** -6, atol=0)  # a last bit, after two roundings
    assert (fused != plain).float().mean() < 1e-3


def test_rms_norm_bf16_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="bf16"):
        kernels.rms_norm_bf16(torch.randn(4, 8).bfloat16(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="bf16"):
        kernels.rms_norm_bf16(torch.randn(4, 8).bfloat16(), torch.ones(7).bfloat16(), 1e-6)
