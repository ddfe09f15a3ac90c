"""dsinfer's small-GEMM CPU kernel (x @ W.T for up to 64 rows of x, a prefill's per-expert matmul) against torch's
matmul, and when `linear` takes it."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dsinfer import kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers.linear import Matmul

linear = Matmul(KernelConfig())  # the kernels on, as a model built with the defaults binds them

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 17, 22, 31, 33, 48, 63, 64])
@pytest.mark.parametrize("n,k", [(1, 5), (7, 64), (100, 130), (2816, 1408), (7, 2048), (100, 1)])
def test_gemm_small_equals_torch(m, n, k):
    g = torch.Generator().manual_seed(m * 10000 + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    torch.testing.assert_close(kernels.gemm_small(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5 + 1e-6 * k)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_small_any_thread_count(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        x, w = torch.randn(48, 136, generator=g), torch.randn(10, 136, generator=g)
        torch.testing.assert_close(kernels.gemm_small(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5 + 1e-6 * 136)
    finally:
        torch.set_num_threads(before)


def test_gemm_small_non_contiguous_x():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 24, generator=g).t(), torch.randn(5, 40, generator=g)
    torch.testing.assert_close(kernels.gemm_small(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_gemm_small_rejects_what_it_cannot_take():
    with pytest.raises(ValueError):
        kernels.gemm_small(torch.randn(kernels.SMALL_MAX_M + 1, 8), torch.randn(4, 8))
    with pytest.raises(ValueError):
        kernels.gemm_small(torch.randn(4, 8), torch.randn(8, 4).t())  # not contiguous
    with pytest.raises(ValueError):
        kernels.gemm_small(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.bfloat16))


def test_only_fp32_batches_of_9_to_64_rows_take_it():
    w = torch.randn(16, 32)
    assert kernels.small_usable(torch.randn(kernels.MAX_M + 1, 32), w)
    assert kernels.small_usable(torch.randn(kernels.SMALL_MAX_M, 32), w)
    assert not kernels.small_usable(torch.randn(kernels.MAX_M, 32), w)  # gemv's
    assert not kernels.small_usable(torch.randn(kernels.SMALL_MAX_M + 1, 32), w)
    assert not kernels.small_usable(torch.randn(16, 32, dtype=torch.bfloat16), w)
    assert not kernels.small_usable(torch.randn(16, 32), w.to(torch.bfloat16))
    assert not kernels.small_usable(torch.randn(16, 32), torch.randn(32, 16).t())  # not contiguous


@pytest.fixture
def calls(monkeypatch):
    """Counts linear()'s calls of gemm_small."""
    seen = []
    real = kernels.gemm_small
    monkeypatch.setattr(kernels, "gemm_small", lambda x, w: seen.append(x.shape[0]) or real(x, w))
    return seen


@pytest.mark.parametrize("m,taken", [(1, False), (8, False), (9, True), (48, True), (64, True), (65, False)])
def test_linear_takes_it_for_9_to_64_rows(calls, m, taken):
    x, w, b = torch.randn(m, 32), torch.randn(20, 32), torch.randn(20)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    assert calls == ([m] if taken else [])


@pytest.mark.parametrize("switch", ["small_gemm", "cpu_kernels"])
def test_linear_leaves_it_when_switched_off(calls, switch):
    x, w = torch.randn(48, 32), torch.randn(20, 32)
    torch.testing.assert_close(Matmul(KernelConfig(**{switch: False}))(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert calls == []


@pytest.mark.parametrize("value,on", [("0", "False"), ("1", "True")])
def test_env_switch(value, on):
    code = "from dsinfer.kernels import KernelConfig; print(KernelConfig.from_options().small_gemm)"
    env = {**os.environ, "DSINFER_SMALL_GEMM": value}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == on
