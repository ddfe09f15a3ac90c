"""dtype="auto": bf16 on CPUs that multiply bf16 natively (AMX, AVX512-BF16), fp32 on others; explicit dtypes win."""
import pytest
import torch

from dsinfer.engine.config import EngineConfig
from dsinfer.kernels import config as kconfig


@pytest.fixture
def cpu(monkeypatch):
    """Pretends the CPU has the given flags, with no DSINFER_CPU_DTYPE override."""
    monkeypatch.delenv(kconfig.CPU_DTYPE_ENV, raising=False)
    return lambda *flags: monkeypatch.setattr(kconfig, "cpu_flags", lambda: frozenset(flags))


@pytest.mark.parametrize("flags,expected", [(("avx2", "fma"), torch.float32),
                                            (("avx2", "fma", "avx512f", "avx512_vnni"), torch.float32),
                                            (("avx2", "fma", "avx512f", "avx512_bf16"), torch.bfloat16),
                                            (("avx2", "fma", "avx512f", "amx_tile", "amx_bf16"), torch.bfloat16)])
def test_auto_follows_the_instruction_set(cpu, flags, expected):
    cpu(*flags)
    assert EngineConfig(dtype="auto").torch_dtype(torch.device("cpu")) is expected
    assert EngineConfig(dtype="auto").torch_dtype(torch.device("cuda")) is torch.bfloat16


def test_an_explicit_dtype_always_wins(cpu):
    cpu("avx2", "fma", "amx_bf16")
    assert EngineConfig(dtype="float32").torch_dtype(torch.device("cpu")) is torch.float32
    cpu("avx2", "fma")
    assert EngineConfig(dtype="bfloat16").torch_dtype(torch.device("cpu")) is torch.bfloat16


def test_the_environment_overrides_auto_and_a_bad_value_is_named(cpu, monkeypatch):
    cpu("avx2", "fma", "amx_bf16")
    monkeypatch.setenv(kconfig.CPU_DTYPE_ENV, "float32")
    assert EngineConfig().torch_dtype(torch.device("cpu")) is torch.float32
    monkeypatch.setenv(kconfig.CPU_DTYPE_ENV, "fp4")
    with pytest.raises(ValueError, match="DSINFER_CPU_DTYPE.*'fp4'"):
        EngineConfig().torch_dtype(torch.device("cpu"))
