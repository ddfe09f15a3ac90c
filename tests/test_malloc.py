"""dsinfer/malloc.py: trimming the heap after loading, and huge pages under weights. Run in fresh interpreters,
since both act on the whole process."""
import ctypes
import os
import subprocess
import sys

import pytest
import torch

from dsinfer import malloc

TRIM = """
import torch
from dsinfer import malloc
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
big = torch.ones(4 << 20); del big  # 16 MiB freed: glibc's threshold rises, so 2 MiB blocks go on the heap
chunks = [torch.ones(1 << 19) for _ in range(64)]
keep = chunks[-1]; del chunks       # 126 MiB free on the heap below a live block
before = rss()
print(malloc.trim(), before - rss())
"""


def run(script: str, **env) -> list[str]:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.split()


def has_malloc_trim() -> bool:
    """Decided from the system, not from dsinfer: the process's C library (glibc) exports malloc_trim."""
    try:
        return hasattr(ctypes.CDLL(None), "malloc_trim")
    except (OSError, TypeError):  # no dlopen(NULL) on this platform
        return False


def thp_mode() -> str | None:
    """The bracketed choice in /sys/kernel/mm/transparent_hugepage/enabled (always, madvise, never), None without."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(not has_malloc_trim(), reason="no glibc malloc_trim on this system")
def test_trim_returns_the_heaps_free_memory_only_when_on(monkeypatch):
    monkeypatch.delenv("DSINFER_MALLOC_TRIM", raising=False)
    trimmed, freed = run(TRIM)
    assert trimmed == "True", "glibc has malloc_trim, but dsinfer's trim() did not call it"
    assert int(freed) > 100  # MiB
    off, freed_off = run(TRIM, DSINFER_MALLOC_TRIM="0")
    assert off == "False" and int(freed_off) < 8


def test_trim_is_a_no_op_without_glibc():
    if has_malloc_trim():
        pytest.skip("this system has glibc's malloc_trim")
    assert malloc.trim() is False


def test_huge_pages_are_asked_for_whole_pages_inside_large_tensors_only(monkeypatch):
    monkeypatch.delenv("DSINFER_HUGEPAGES", raising=False)
    big, small = torch.empty(3 * malloc.HUGE // 4 + 5), torch.empty(1000)
    advised = malloc.advise_hugepages([big, small])
    if thp_mode() in ("always", "madvise"):
        assert malloc.hugepages_enabled()
        assert 0 < advised <= big.numel() * 4 and advised % malloc.HUGE == 0
    else:  # the system gives no huge pages on request: nothing is advised
        assert not malloc.hugepages_enabled() and advised == 0
    monkeypatch.setenv("DSINFER_HUGEPAGES", "0")
    assert not malloc.hugepages_enabled() and malloc.advise_hugepages([big]) == 0
