"""The quantized weight container: packing, views, and quantized matmul against dequantize-then-matmul."""
import pytest
import torch
import torch.nn.functional as F

from dsinfer import kernels
from dsinfer.layers.quant_linear import qlinear
from dsinfer.quant.qtensor import QTensor, pack_int4, unpack_int4


@pytest.mark.parametrize("k,group", [(256, 128), (200, 128), (64, 64), (48, 16)])
def test_int4_pack_unpack_round_trip(k, group):
    codes = torch.randint(-8, 8, (3, 5, k), dtype=torch.int8)
    packed = pack_int4(codes, group)
    assert packed.shape == (3, 5, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, group), codes)


def test_int4_layout_is_half_split_per_group():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(2)[None]  # one row, K=32, one group
    packed = pack_int4(codes, 32)
    assert int(packed[0, 0]) == (codes[0, 0] + 8) | ((codes[0, 16] + 8) << 4)


@pytest.mark.parametrize("bits,group", [(8, 96), (4, 32), (4, 128)])
def test_rtn_error_is_within_half_a_step(bits, group):
    w = torch.randn(40, 96)
    qt = QTensor.empty(w.shape, bits, group)
    qt.store(w)
    scale = qt.scales.repeat_interleave(qt.group_size, -1)[:, :96]
    err = (qt.dequantize() - w).abs()
    inside = (w / scale) <= (1 << (bits - 1)) - 0.5  # int4's grid is -8..7: the far positive end clamps
    assert (err[inside] <= scale.abs()[inside] / 2 + 1e-6).all()
    assert (err <= scale.abs() + 1e-6).all()


def test_views_share_storage_with_the_stack():
    qt = QTensor.empty((4, 6, 64), 4, 32)
    qt.store(torch.randn(4, 6, 64))
    w = torch.randn(3, 64)
    qt[2, 3:].store(w)
    assert torch.equal(qt[2].dequantize()[3:], qt[2, 3:].dequantize())
    assert (qt[2].dequantize()[3:] - w).abs().max() < 0.5


@pytest.mark.parametrize("m", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mins,perm", [(False, False), (True, True)])
def test_quantized_linear_equals_dequantize_then_matmul(m, bits, mins, perm, monkeypatch):
    monkeypatch.setattr("dsinfer.layers.quant_linear.TILE_VALUES", 64 * 40)  # several tiles
    n, k = 70, 200
    qt = QTensor.empty((n, k), bits, 128, with_mins=mins)
    qt.store(torch.randn(n, k))
    if mins:
        qt.mins.normal_()
    if perm:
        qt.perm = torch.randperm(k)
    x = torch.randn(m, k)
    want = F.linear(x, qt.to_dense())
    for on in (True, False):
        torch.testing.assert_close(qlinear(x, qt, use_kernels=on), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 5, 8])
def test_int8_activations_stay_close_to_the_exact_result(m, monkeypatch):
    k = 256
    x = torch.randn(m, k)
    for bits in (4, 8):
        qt = QTensor.empty((96, k), bits, 128)
        qt.store(torch.randn(96, k))
        exact = F.linear(x, qt.to_dense())
        y = qlinear(x, qt, use_kernels=True, int8=True)
        assert not torch.allclose(y, exact, rtol=1e-6, atol=1e-6)  # the integer path really ran
        assert float((y - exact).norm() / exact.norm()) < 2e-2


def test_bad_bits_are_refused():
    with pytest.raises(ValueError, match="4 or 8 bits"):
        QTensor.empty((4, 8), 3, 8)
    with pytest.raises(ValueError, match="even"):
        QTensor.empty((4, 7), 4, 8)


def test_prefill_tiles_round_activations_as_the_decode_kernel_does(monkeypatch):
    """With int8 activations a row gives the same result in a decode batch (kernel) and in a prefill (tiles)."""
    qt = QTensor.empty((80, 256), 4, 128)
    qt.store(torch.randn(80, 256))
    x = torch.randn(20, 256)
    big = qlinear(x, qt, use_kernels=True, int8=True)  # 20 rows: dequantized tiles
    small = torch.cat([qlinear(x[i:i + 4], qt, use_kernels=True, int8=True) for i in range(0, 20, 4)])  # the kernel
    torch.testing.assert_close(big, small, rtol=1e-5, atol=1e-4)  # outputs up to ~60: fp32 sums in other orders
    blocks = x.unflatten(-1, (-1, 32))
    d = blocks.abs().amax(-1, keepdim=True) / 127
    want = (torch.round(blocks * (1 / d)).clamp(-127, 127) * d).flatten(-2)
    torch.testing.assert_close(kernels.round_to_int8(x), want, rtol=0, atol=1e-6)


@pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")
@pytest.mark.parametrize("m", [9, 16, 37, 64])
@pytest.mark.parametrize("bits", [4, 8])
def test_batches_of_9_to_64_rows_take_the_decode_kernel_8_rows_at_a_time(m, bits):
    """small (KernelConfig.small_gemm): each row gets what a decode batch of its 8 gives it, close to the exact
    product; off, the same rows expand w in tiles; past SMALL_MAX_M rows, tiles either way."""
    qt = QTensor.empty((72, 256), bits, 128)
    qt.store(torch.randn(72, 256))
    x = torch.randn(m, 256)
    by_eight = torch.cat([qlinear(rows, qt, use_kernels=True, int8=1) for rows in x.split(8)])
    assert torch.equal(qlinear(x, qt, use_kernels=True, int8=1, small=True), by_eight)
    exact = F.linear(x, qt.to_dense())
    assert float((by_eight - exact).norm() / exact.norm()) < 2e-2
    tiles = qlinear(x, qt, use_kernels=True, int8=1)
    torch.testing.assert_close(tiles, by_eight, rtol=1e-5, atol=1e-4)  # x rounded alike, sums in other orders
    big = torch.randn(kernels.SMALL_MAX_M + 1, 256)
    assert torch.equal(qlinear(big, qt, use_kernels=True, int8=1, small=True), qlinear(big, qt, use_kernels=True, int8=1))


def test_matmul_passes_the_small_gemm_switch_to_quantized_weights(monkeypatch):
    from dsinfer.kernels import KernelConfig
    from dsinfer.layers import linear
    seen = []
    monkeypatch.setattr(linear, "qlinear", lambda *a: seen.append(a[-1]) or a[0])
    qt = QTensor.empty((8, 32), 8, 32)
    for on in (True, False):
        linear.Matmul(KernelConfig(small_gemm=on))(torch.randn(12, 32), qt)
    assert seen == [True, False]
