"""dsinfer/malloc.py: trimming the heap after loading, and huge pages under weights. Run in fresh interpreters,
since both act on the whole process."""
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_trim_returns_the_heaps_free_memory_only_when_on():
    trimmed, freed = run(TRIM)
    if trimmed != "True":
        pytest.skip("not glibc")
    assert int(freed) > 100  # MiB
    off, freed_off = run(TRIM, DSINFER_MALLOC_TRIM="0")
    assert off == "False" and int(freed_off) < 8


def test_huge_pages_are_asked_for_whole_pages_inside_large_tensors_only(monkeypatch):
    if not malloc.hugepages_enabled():
        pytest.skip("transparent huge pages are off on this machine")
    big, small = torch.empty(3 * malloc.HUGE // 4 + 5), torch.empty(1000)
    advised = malloc.advise_hugepages([big, small])
    assert 0 < advised <= big.numel() * 4 and advised % malloc.HUGE == 0
    monkeypatch.setenv("DSINFER_HUGEPAGES", "0")
    assert malloc.advise_hugepages([big]) == 0
