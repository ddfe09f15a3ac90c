import functools
import os
import shlex
import shutil

import pytest
import torch

from tests.checkpoints import build_all

# The tests compare with transformers in fp32 (and their subprocesses inherit this): dtype="auto" would mean bf16
# on CPUs with AMX or AVX512-BF16. tests/engine/test_auto_dtype.py checks the choice itself.
os.environ.setdefault("DSINFER_CPU_DTYPE", "float32")
# For the same reason quantized prefills keep fp32 tiles: several tests check that a sequence gets the same tokens
# alone and batched, split across processes, or with speculation, which bf16 products (rounded differently from
# the decode kernels' fp32 ones) cannot promise. tests/layers/test_bf16_tiles.py turns them on.
os.environ.setdefault("DSINFER_BF16_PREFILL_TILES", "0")


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="session")
def llms(ckpts):
    """One fp32 LLM per checkpoint, shared by the tests that only read from it."""
    from dsinfer import LLM
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(ckpts[name], **kw)
        return cache[key]
    return get


def random_prompts(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@functools.cache
def kernels_should_build() -> str | None:
    """The compiler that should build the C kernels on this machine (the CPU has AVX2 and FMA, and $CC or cc is on
    PATH), or None where their absence is expected."""
    from dsinfer import kernels
    compiler = (shlex.split(os.environ.get("CC", "")) or ["cc"])[0]
    return shutil.which(compiler) if kernels.cpu_has_avx2() else None


@functools.cache
def kernel_build_error() -> str:
    """Why the kernels did not build, from a fresh attempt (the compiler's own message where there is one)."""
    from dsinfer import kernels
    build = getattr(kernels, "build", None) or getattr(getattr(kernels, "lib", None), "build", None)
    if build is None:
        return "see the 'CPU kernels unavailable' warning logged by dsinfer.kernels"
    try:
        build()
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        stderr = getattr(exc, "stderr", None) or b""
        return f"{exc}\n{stderr.decode(errors='replace') if isinstance(stderr, bytes) else stderr}".strip()
    return "library() returned None, yet a fresh build succeeded"


def is_kernel_skip(item) -> bool:
    """Whether item carries a true skipif because the kernels were not built (the kernel test modules'
    `library() is None`), not one for an instruction set this CPU lacks."""
    return any(m.args and m.args[0] is True and "built" in str(m.kwargs.get("reason", ""))
               for m in item.iter_markers("skipif"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A kernel test skipped on a machine that should build the kernels fails instead: a runner without working
    kernels must not pass by skipping most of the suite. Machines without AVX2 or a compiler still skip."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and is_kernel_skip(item) and (compiler := kernels_should_build()):
        report.outcome = "failed"
        report.longrepr = (f"the C kernels failed to build on a machine with AVX2 and a compiler ({compiler}): "
                           f"{kernel_build_error()}")
