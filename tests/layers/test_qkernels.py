"""dsinfer's quantized-weight CPU kernels (qgemv, dequant) against a plain torch reference of the format."""
import pytest
import torch

from dsinfer import kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers.linear import Matmul
from dsinfer.quant.qtensor import QTensor

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")



# (N, K, G): per-channel (G = K, also K not a multiple of 8), groups of 32 / 128, a partial last group, a group
# size above K (one group of 64), rows spanning several row blocks, and K large enough to be walked in chunks.
SHAPES = [(1, 64, 64), (5, 10, 10), (3, 1026, 1026), (37, 2048, 2048), (7, 200, 128), (8, 64, 128), (16, 96, 32),
          (6, 200, 32), (33, 10944, 128), (2, 10944, 10944), (20, 2048, 128)]


def ref_dequant(q, scales, mins, bits, g, k):
    """W [N, K] in fp64 from the stored format, written out with plain torch ops."""
    if bits == 8:
        codes = q.double()
    else:
        parts = []
        for chunk in q.split(g // 2, dim=1):  # one group's bytes: low nibbles, then high nibbles
            parts += [chunk & 15, chunk >> 4]
        codes = torch.cat(parts, dim=1).double() - 8
    w = codes * scales.double().repeat_interleave(g, dim=1)[:, :k]
    return w if mins is None else w + mins.double().repeat_interleave(g, dim=1)[:, :k]


def random_quantized(n, k, g, bits, with_mins, seed):
    gen = torch.Generator().manual_seed(seed)
    ng = -(-k // g)
    if bits == 8:
        q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    scales = (0.5 + torch.rand(n, ng, generator=gen)) / (127 if bits == 8 else 8)
    mins = 0.1 * torch.randn(n, ng, generator=gen) if with_mins else None
    return q, scales, mins


@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("with_mins", [False, True])
def test_qgemv_equals_dequantize_then_matmul(n, k, g, bits, with_mins):
    q, scales, mins = random_quantized(n, k, g, bits, with_mins, seed=n * 7 + k + g + bits)
    w = ref_dequant(q, scales, mins, bits, g, k)
    x = torch.randn(kernels.MAX_M, k, generator=torch.Generator().manual_seed(k))
    for m in range(1, kernels.MAX_M + 1):
        ref = (x[:m].double() @ w.T).float()
        torch.testing.assert_close(kernels.qgemv(x[:m], q, scales, mins, bits, g), ref,
                                   rtol=1e-5, atol=1e-5 + 1e-6 * k)  # fp32 sum order


@pytest.mark.parametrize("bits,g", [(8, 2048), (4, 128), (4, 2048)])
def test_activations_far_from_zero_mean(bits, g):
    """int4 sums the stored nibbles (code + 8) and takes 8 * scale * sum(x) off per group: still fp32-close."""
    q, scales, mins = random_quantized(24, 2048, g, bits, True, seed=4)
    x = torch.randn(kernels.MAX_M, 2048, generator=torch.Generator().manual_seed(5)) + 3
    ref = (x.double() @ ref_dequant(q, scales, mins, bits, g, 2048).T).float()
    torch.testing.assert_close(kernels.qgemv(x, q, scales, mins, bits, g), ref, rtol=1e-5, atol=1e-5 + 1e-6 * 2048)


@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("with_mins", [False, True])
def test_dequant_row_ranges(n, k, g, bits, with_mins):
    q, scales, mins = random_quantized(n, k, g, bits, with_mins, seed=n + k + g + bits)
    w = ref_dequant(q, scales, mins, bits, g, k).float()
    for n0, n1 in {(0, n), (0, 1), (n // 2, n), (n - 1, n), (n // 3, (2 * n) // 3)}:
        torch.testing.assert_close(kernels.dequant(q, scales, mins, bits, g, k, n0, n1), w[n0:n1],
                                   rtol=1e-6, atol=1e-6)


def test_dequant_into_a_given_buffer():
    q, scales, mins = random_quantized(12, 256, 128, 4, True, seed=1)
    out = torch.empty(5, 256)
    assert kernels.dequant(q, scales, mins, 4, 128, 256, 3, 8, out=out) is out
    torch.testing.assert_close(out, ref_dequant(q, scales, mins, 4, 128, 256)[3:8].float(), rtol=1e-6, atol=1e-6)


def test_strided_inputs_are_copied_not_misread():
    q, scales, _ = random_quantized(9, 128, 32, 8, False, seed=2)
    x = torch.randn(128, 3).T  # not contiguous
    ref = (x.double() @ ref_dequant(q, scales, None, 8, 32, 128).T).float()
    torch.testing.assert_close(kernels.qgemv(x, q, scales, None, 8, 32), ref, rtol=1e-5, atol=1e-5)


def test_a_mismatched_format_is_refused():
    q, scales, _ = random_quantized(4, 64, 32, 4, False, seed=3)
    with pytest.raises(ValueError):
        kernels.qgemv(torch.randn(1, 64), q, scales, None, 8, 32)  # int4 codes called as int8
    with pytest.raises(ValueError):
        kernels.qgemv(torch.randn(1, 64), q, scales, None, 4, 64)  # wrong number of groups


def test_only_decode_sized_fp32_cpu_inputs_take_the_kernel():
    assert kernels.q_usable(torch.randn(kernels.MAX_M, 32))
    assert not kernels.q_usable(torch.randn(kernels.MAX_M + 1, 32))
    assert not kernels.q_usable(torch.randn(2, 32, dtype=torch.bfloat16))
    assert not kernels.q_usable(torch.randn(1, 2, 32))
    assert kernels.dequant_usable(torch.zeros(4, 8, dtype=torch.int8))


def ref_int8_activations(x):
    """x as the int8-activation path sees it, in fp64: per row, blocks of 32 columns quantized to int8 with
    d = max|x| / 127 (fp32 arithmetic, x * (1 / d) rounded half to even), then d * xq."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(blocks * inv).clamp(-127, 127)
    return (xq.double() * d.double()).reshape(m, k)


# (K, G): groups of 128 / 64, per-channel, and K = 1408 (11 groups of 128); int4 needs half-groups of 32.
INT8X_SHAPES = [(256, 128), (256, 256), (256, 64), (1408, 128), (1408, 1408), (1408, 64), (2048, 128),
                (2048, 2048), (2048, 64)]


@pytest.mark.parametrize("k,g", INT8X_SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("with_mins", [False, True])
def test_int8_activations_equal_quantize_x_then_matmul(k, g, bits, with_mins):
    assert kernels.int8_activations_fit(bits, k, g)
    n = 19  # a partial row block, and an odd split over threads
    q, scales, mins = random_quantized(n, k, g, bits, with_mins, seed=n * 3 + k + g + bits)
    w = ref_dequant(q, scales, mins, bits, g, k)
    x = torch.randn(kernels.MAX_M, k, generator=torch.Generator().manual_seed(k + g))
    x[-1, :32] = 0  # an all-zero block: d = 0
    for m in range(1, kernels.MAX_M + 1):
        y = kernels.qgemv(x[:m], q, scales, mins, bits, g, int8_activations=True)
        ref = (ref_int8_activations(x[:m]) @ w.T).float()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 + 1e-6 * k)  # fp32 sum order
        exact = x[:m].double() @ w.T
        assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-2


VNNI_KERNELS = [pytest.param(2, marks=pytest.mark.skipif("avx_vnni" not in kernels.cpu_flags(), reason="this CPU has "
                                                           "no AVX-VNNI: the qgemv_*_x8_vnni kernels cannot run here")),
                pytest.param(3, marks=pytest.mark.skipif(not {"avx512_vnni", "avx512vl"} <= kernels.cpu_flags(),
                                                         reason="this CPU has no AVX512-VNNI: the qgemv_*_x8_vnni512 "
                                                                "kernels cannot run here"))]


@pytest.mark.parametrize("kernel", VNNI_KERNELS)
@pytest.mark.parametrize("k,g", INT8X_SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_vnni_kernels_give_the_avx2_kernels_sums_exactly(k, g, bits, kernel):
    """vpdpbusd (AVX-VNNI's, or AVX512-VNNI's EVEX form) computes the same int32 block sums as maddubs + madd, and
    everything after them is shared."""
    q, scales, mins = random_quantized(19, k, g, bits, True, seed=k + g + bits)
    x = torch.randn(kernels.MAX_M, k, generator=torch.Generator().manual_seed(k * 7 + g)) * 3 + 1
    for m in range(1, kernels.MAX_M + 1):
        avx2 = kernels.qgemv(x[:m], q, scales, mins, bits, g, int8_activations=1)
        assert torch.equal(kernels.qgemv(x[:m], q, scales, mins, bits, g, int8_activations=kernel), avx2)


def test_vnni_is_chosen_only_where_the_cpu_has_it(monkeypatch):
    from dsinfer.kernels import config
    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert config.KernelConfig().resolve("cpu").int8_kernel == (1 if kernels.library() else 0)
    assert config.KernelConfig().int8_kernel == 1  # unresolved too: a VNNI kernel would be an illegal instruction
    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx_vnni"}))
    assert config.KernelConfig().resolve("cpu").int8_kernel == (2 if kernels.library() else 0)
    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512vl", "avx512_vnni"}))
    assert config.KernelConfig().resolve("cpu").int8_kernel == (3 if kernels.library() else 0)
    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}))
    assert config.KernelConfig().resolve("cpu").int8_kernel == (1 if kernels.library() else 0)
    assert config.KernelConfig(vnni=False).int8_kernel == 1 and config.KernelConfig(int8_activations=False).int8_kernel == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_activations_far_from_zero_mean(bits):
    q, scales, mins = random_quantized(24, 2048, 128, bits, True, seed=4)
    w = ref_dequant(q, scales, mins, bits, 128, 2048)
    x = torch.randn(kernels.MAX_M, 2048, generator=torch.Generator().manual_seed(5)) + 3
    ref = (ref_int8_activations(x) @ w.T).float()
    torch.testing.assert_close(kernels.qgemv(x, q, scales, mins, bits, 128, int8_activations=True), ref, rtol=1e-5, atol=1e-5 + 1e-6 * 2048)


@pytest.mark.parametrize("bits,k,g", [(4, 200, 128), (8, 200, 128), (4, 96, 32), (4, 160, 160), (8, 80, 80),
                                      (4, 224, 128), (8, 200, 64)])
def test_int8_activations_fall_back_to_fp32_where_blocks_would_straddle(bits, k, g):
    assert not kernels.int8_activations_fit(bits, k, g)
    q, scales, mins = random_quantized(9, k, g, bits, True, seed=k + g)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k))
    fp32 = kernels.qgemv(x, q, scales, mins, bits, g, int8_activations=False)
    assert torch.equal(kernels.qgemv(x, q, scales, mins, bits, g, int8_activations=True), fp32)
    torch.testing.assert_close(fp32, (x.double() @ ref_dequant(q, scales, mins, bits, g, k).T).float(),
                               rtol=1e-5, atol=1e-5)


def test_the_int8_activation_switch():
    q, scales, _ = random_quantized(16, 256, 128, 4, False, seed=6)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(6))
    fp32 = kernels.qgemv(x, q, scales, None, 4, 128)
    forced = kernels.qgemv(x, q, scales, None, 4, 128, int8_activations=True)
    assert not torch.equal(fp32, forced)
    qt = QTensor(q, scales, None, 4, 128, 256)
    on, off = Matmul(KernelConfig(int8_activations=True)), Matmul(KernelConfig(int8_activations=False))
    assert torch.equal(on(x, qt), forced) and torch.equal(off(x, qt), fp32)



def test_the_int8_activation_switch_reads_the_environment(monkeypatch):
    monkeypatch.delenv("DSINFER_INT8_ACTIVATIONS", raising=False)
    assert KernelConfig.from_options().int8_activations  # on by default
    for value, on in (("1", True), ("0", False), ("yes", True)):
        monkeypatch.setenv("DSINFER_INT8_ACTIVATIONS", value)
        assert KernelConfig.from_options().int8_activations is on
    assert KernelConfig.from_options(int8_activations=True).int8_activations  # an option wins
