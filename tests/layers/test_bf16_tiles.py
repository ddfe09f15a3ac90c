"""KernelConfig.bf16_prefill_tiles: quantized prefill matmuls (linear layers, MLPs, routed experts) expand their
weights to bf16 and multiply in bf16, against the fp32 path they replace; off, the fp32 path exactly."""
import math

import pytest
import torch
import torch.nn.functional as F

from dsinfer import LLM, kernels
from dsinfer.engine.model_runner import score
from dsinfer.kernels import KernelConfig
from dsinfer.layers import quant_linear
from dsinfer.layers.linear import Matmul
from dsinfer.layers.moe import Experts
from dsinfer.models.quant_plan import Unit, quantize_unit
from dsinfer.quant.qtensor import QTensor
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")
needs_bf16 = pytest.mark.skipif(not kernels.cpu_flags() & {"amx_bf16", "avx512_bf16"},
                                reason="this CPU has neither AMX-BF16 nor AVX512-BF16: bf16 tiles stay off")
ON, OFF = KernelConfig(bf16_prefill_tiles=True), KernelConfig(bf16_prefill_tiles=False)


def quantized(shape, bits, group, mins=False, perm=False, seed=0):
    torch.manual_seed(seed)
    qt = QTensor.empty(shape, bits, group, with_mins=mins)
    qt.store(torch.randn(shape) * 0.1)
    if mins:
        qt.mins.normal_(0, 0.01)
    if perm:  # one permutation per matrix of the stack
        qt.perm = torch.stack([torch.randperm(shape[-1]) for _ in range(math.prod(shape[:-2]))]).view(
            *shape[:-2], shape[-1])
    return qt


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("bits,n,k,g", [(8, 37, 2048, 2048), (4, 40, 200, 128), (8, 9, 102, 100), (4, 33, 202, 36)])
@pytest.mark.parametrize("mins", [False, True])
def test_bf16_dequant_is_fp32_dequant_rounded_to_nearest_even(bits, n, k, g, mins):
    qt = quantized((n, k), bits, g, mins)
    args = (qt.q, qt.scales, qt.mins, bits, qt.group_size, k)
    for n0, n1 in ((0, n), (3, n - 2)):
        want = kernels.dequant(*args, n0, n1).to(torch.bfloat16)  # torch's fp32 -> bf16 rounds to nearest even
        assert torch.equal(kernels.dequant(*args, n0, n1, dtype=torch.bfloat16), want)


def test_bf16_dequant_rounds_ties_to_even():
    """1 + 2^-8 lies halfway between two bf16 values and goes down to 1 (even); 1 + 3 * 2^-8 goes up."""
    q = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    scales = torch.tensor([[1 + 2 ** -8], [1 + 3 * 2 ** -8]])
    out = kernels.dequant(q, scales, None, 8, 2, 2, dtype=torch.bfloat16).float()
    assert out.tolist() == [[1.0, 1.0], [1 + 2 ** -6, -(1 + 2 ** -6)]]


def test_bf16_dequant_refuses_other_dtypes_and_mismatched_buffers():
    qt = quantized((8, 64), 8, 64)
    args = (qt.q, qt.scales, None, 8, 64, 64)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernels.dequant(*args, dtype=torch.float16)
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.dequant(*args, out=torch.empty(8, 64), dtype=torch.bfloat16)


@needs_bf16
@pytest.mark.parametrize("m", [9, 40, 100])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mins,perm", [(False, False), (True, True)])
def test_bf16_tiles_stay_within_bf16_rounding_of_the_fp32_path(m, bits, mins, perm, monkeypatch):
    monkeypatch.setattr(quant_linear, "BF16_TILE_VALUES", 64 * 256)  # several tiles and a short last one
    qt = quantized((200, 256), bits, 128 if bits == 4 else 256, mins, perm)
    x = torch.randn(m, 256)
    y, fp32 = Matmul(ON)(x, qt), Matmul(OFF)(x, qt)
    xp = x if qt.perm is None else x[:, qt.perm]
    bf16_inputs = F.linear(xp.bfloat16().double(), qt.dequantize().bfloat16().double())
    torch.testing.assert_close(y.double(), bf16_inputs, rtol=2 ** -7, atol=1e-3)  # bf16 products, rounded once
    assert y.dtype == torch.float32 and y.shape == (m, 200)
    assert rel_err(y, fp32) < 1e-2
    assert not torch.allclose(y, fp32, rtol=1e-5, atol=1e-5)  # the bf16 tiles really ran


def test_the_switch_off_is_the_fp32_path_bit_for_bit(monkeypatch):
    """Off: fp32 tiles with x rounded to int8, as before the switch existed, every tile expanded in fp32 (40 rows:
    small_gemm off too, which would otherwise run the decode kernel 8 rows at a time)."""
    dtypes = []
    real = kernels.dequant
    monkeypatch.setattr(kernels, "dequant", lambda *a, **kw: dtypes.append(kw.get("dtype")) or real(*a, **kw))
    monkeypatch.setattr(quant_linear, "TILE_VALUES", 64 * 256)
    qt = quantized((200, 256), 4, 128)
    x = torch.randn(40, 256)
    kc = KernelConfig(bf16_prefill_tiles=False, small_gemm=False)
    y = Matmul(kc)(x, qt)
    old = quant_linear.tiled(kernels.round_to_int8(x), qt, True)
    assert torch.equal(y, old) and set(dtypes) == {torch.float32}
    dtypes.clear()
    Matmul(ON)(x, qt)
    assert set(dtypes) == {torch.bfloat16}


def test_bf16_activations_give_the_same_numbers_with_the_switch_on_or_off():
    """bf16 x already multiplied bf16 tiles (expanded through fp32): the bf16 kernel only skips that step."""
    qt = quantized((300, 256), 4, 128, mins=True)
    x = torch.randn(30, 256).bfloat16()
    assert torch.equal(Matmul(ON)(x, qt), Matmul(OFF)(x, qt))


def quantized_experts(kc, bits, mins=False, perm=False, n=8, hidden=64, inter=48):
    ex = Experts(n, hidden, inter, kc)
    for i, attr in enumerate(("gate_up_proj", "down_proj")):
        shape = tuple(getattr(ex, attr).shape)
        quantize_unit(Unit(attr, ex, attr, []), bits, 32)
        setattr(ex, attr, quantized(shape, bits, 32, mins, perm, seed=i))
    return ex


def routing(tokens, n=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n - 1, generator=g)[:k] for _ in range(tokens)])  # expert n-1 idle
    return torch.randn(tokens, 64, generator=g), torch.rand(tokens, k, generator=g), ids


@needs_bf16
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mins", [False, True])
def test_quantized_experts_in_bf16_stay_close_to_the_fp32_experts(bits, mins, monkeypatch):
    ex = quantized_experts(ON, bits, mins)
    x, weights, ids = routing(70)
    ran = []
    real = Experts.dequantized
    monkeypatch.setattr(Experts, "dequantized", lambda self, *a: ran.append(1) or real(self, *a))
    y = ex(x, weights, ids)
    ex.bf16_tiles = ex.matmul.bf16_tiles = False
    ex.matmul.int8_activations = 0  # the exact fp32 result (int8 x would add its own rounding)
    fp32 = ex(x, weights, ids)
    assert ran == [1] and y.dtype == torch.float32
    assert rel_err(y, fp32) < 1e-2
    assert not torch.allclose(y, fp32, rtol=1e-5, atol=1e-5)


@needs_bf16
def test_experts_with_permuted_columns_take_bf16_tiles_expert_by_expert(monkeypatch):
    """Each expert's permutation reorders x differently: such stacks run `grouped`, each matmul in bf16 tiles."""
    ex = quantized_experts(ON, 4, mins=True, perm=True)
    x, weights, ids = routing(70)
    monkeypatch.setattr(Experts, "dequantized", lambda *a: pytest.fail("permuted stacks cannot be dequantized whole"))
    y = ex(x, weights, ids)
    ex.bf16_tiles = ex.matmul.bf16_tiles = False
    ex.matmul.int8_activations = 0
    fp32 = ex(x, weights, ids)
    assert rel_err(y, fp32) < 1e-2 and not torch.allclose(y, fp32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bf16", [True, False])
def test_quantized_experts_take_bf16_activations(bf16):
    """A quantized model of dtype bf16 (auto on AMX CPUs) runs its experts' prefill; the weights have no dtype."""
    ex = quantized_experts(KernelConfig(bf16_prefill_tiles=bf16), 8)
    x, weights, ids = routing(40)
    y = ex(x.bfloat16(), weights, ids)
    assert y.dtype == torch.bfloat16 and rel_err(y, ex(x, weights, ids)) < 2e-2


def test_padding_rows_leaves_each_row_its_own_result():
    qt = quantized((96, 128), 8, 128)
    x = torch.randn(37, 128)
    assert quant_linear.padded_rows(x).shape == (48, 128) and quant_linear.padded_rows(x[:32]).shape == (32, 128)
    one = torch.cat([quant_linear.qlinear(x[i:i + 1], qt, bf16_tiles=True) for i in range(37)])  # 1 + 15 rows
    torch.testing.assert_close(quant_linear.qlinear(x, qt, bf16_tiles=True), one, rtol=1e-2, atol=1e-3)


def test_the_switch_resolves_off_without_native_bf16(monkeypatch):
    monkeypatch.setattr("dsinfer.kernels.config.cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not KernelConfig().resolve(torch.device("cpu")).bf16_prefill_tiles
    monkeypatch.setattr("dsinfer.kernels.config.cpu_flags", lambda: frozenset({"avx2", "fma", "amx_bf16"}))
    assert KernelConfig().resolve(torch.device("cpu")).bf16_prefill_tiles
    assert not KernelConfig(cpu_kernels=False).bf16_prefill_tiles
    monkeypatch.setenv("DSINFER_BF16_PREFILL_TILES", "0")
    assert not KernelConfig.from_options().bf16_prefill_tiles
    monkeypatch.setenv("DSINFER_BF16_PREFILL_TILES", "1")
    assert KernelConfig.from_options().bf16_prefill_tiles


@needs_bf16
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_quantized_model_prefills_in_bf16_close_to_fp32(ckpts, quantization, monkeypatch):
    models = {}
    for on in ("1", "0"):
        monkeypatch.setenv("DSINFER_BF16_PREFILL_TILES", on)
        models[on] = LLM(ckpts["v2-lite"], quantization=quantization, dtype="float32").model
    assert models["1"].model.layers[1].mlp.experts.bf16_tiles and not models["0"].model.layers[1].mlp.experts.bf16_tiles
    for prompt in random_prompts([33, 64]):
        a, b = score(models["1"], prompt).log_softmax(-1), score(models["0"], prompt).log_softmax(-1)
        assert not torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        assert float((b.exp() * (b - a)).sum(-1).median()) < 0.01  # KL(fp32 || bf16) per position
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


@pytest.mark.skipif(not kernels.amx_ready(), reason="needs AMX-BF16 tiles (amx_tile, amx_bf16)")
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_on_amx_tiles_equal_torch_matmul(bits, monkeypatch):
    """KernelConfig.amx_experts: each expert's expanded bf16 buffer multiplied on the AMX kernel or by torch."""
    ex = quantized_experts(ON, bits, inter=64)
    x, weights, ids = routing(40)
    calls = []
    real = kernels.amx_grouped_mm
    monkeypatch.setattr(kernels, "amx_grouped_mm", lambda *a: calls.append(1) or real(*a))
    assert ex.amx
    y = ex(x, weights, ids)
    assert len(calls) == 2 * 7  # gate_up and down of each of the 7 experts used
    ex.amx = False
    ref = ex(x, weights, ids)
    assert len(calls) == 2 * 7
    assert rel_err(y, ref) < 1e-2
