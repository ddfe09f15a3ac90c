"""The AMX-BF16 kernel for a prefill's routed-expert products (KernelConfig.amx_experts) against
torch._grouped_mm, the path it replaces. Runs only where the CPU (and OS) offers AMX-BF16 tiles."""
import pytest
import torch

from dsinfer import kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers.moe import Experts

pytestmark = pytest.mark.skipif(not kernels.amx_ready(), reason="needs AMX-BF16 tiles (amx_tile, amx_bf16)")


def problem(t: int, e: int, n: int, k: int, seed: int, empty: tuple = ()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).bfloat16()
    w = (torch.randn(e, n, k, generator=g) / k ** 0.5).bfloat16()
    ids = torch.randint(0, e, (t,), generator=g)
    for i in empty:
        ids[ids == i] = (i + 1) % e
    return x, w, torch.bincount(ids, minlength=e).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("t,e,n,k", [(1, 1, 16, 32), (37, 4, 40, 64), (130, 8, 48, 224), (300, 3, 33, 96)])
def test_equals_torch_grouped_mm(t, e, n, k):
    """Tails of tokens (not a multiple of 16) and of weight rows (n % 16), more than 64 tokens per expert (several
    passes over a weight block), an expert with no tokens: fp32 sums rounded to bf16 once, as torch does; the
    order of the sums may differ, so a last-bit difference is allowed."""
    x, w, offs = problem(t, e, n, k, seed=t + n, empty=(1,) if e > 2 else ())
    y = kernels.amx_grouped_mm(x, w, offs)
    ref = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    exact = torch.cat([x[a:b].float() @ w[i].float().T for i, (a, b) in enumerate(zip([0, *offs[:-1]], offs))])
    torch.testing.assert_close(y.float(), exact, rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(y, ref, rtol=8e-3, atol=1e-3)


def test_rejects_what_it_cannot_take():
    x, w, offs = problem(20, 2, 16, 40, seed=0)
    with pytest.raises(ValueError, match="K % 32"):
        kernels.amx_grouped_mm(x, w, offs)
    x, w, offs = problem(20, 2, 16, 64, seed=0)
    with pytest.raises(ValueError, match="offs must be int32"):
        kernels.amx_grouped_mm(x, w, offs.long())
    with pytest.raises(ValueError, match="bad sizes or offsets"):
        kernels.amx_grouped_mm(x, w, torch.tensor([30, 20], dtype=torch.int32))


def test_experts_layer_with_and_without_amx(monkeypatch):
    """The switch: the same layer, its bf16 prefill experts on the AMX kernel and on torch._grouped_mm."""
    torch.manual_seed(2)
    ex = Experts(8, 64, 96, KernelConfig().resolve("cpu"))
    torch.nn.init.normal_(ex.gate_up_proj, std=0.1)
    torch.nn.init.normal_(ex.down_proj, std=0.1)
    ex.to(torch.bfloat16)
    x, weights = torch.randn(90, 64).bfloat16(), torch.rand(90, 2)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(90)])
    calls = []
    real = kernels.amx_grouped_mm
    monkeypatch.setattr(kernels, "amx_grouped_mm", lambda *a: calls.append(1) or real(*a))
    assert ex.amx
    y = ex(x, weights, ids)
    assert len(calls) == 2  # gate_up and down
    ex.amx = False
    ref = ex(x, weights, ids)
    assert len(calls) == 2
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert (y.float() - ref.float()).abs().mean() < 2e-3
