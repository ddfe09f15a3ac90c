"""The fixed mmap threshold (dsinfer/malloc.py): freed temporaries leave resident memory, where glibc's rising
threshold would keep them on a fragmented heap. Run in a fresh interpreter: mallopt is process-wide."""
import os
import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from dsinfer import malloc
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
tuned = malloc.tune()
big = torch.ones(4 << 20); del big   # 16 MiB freed: glibc's threshold would rise to 16 MiB
before = rss()
chunks = [torch.ones(1 << 19) for _ in range(64)]  # 64 x 2 MiB, then free all but the last
keep = chunks[-1]; del chunks
print(tuned, rss() - before)
"""


def run(env_extra):
    env = {**os.environ, **env_extra}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    tuned, grown = out.stdout.split()
    return tuned == "True", int(grown)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_temporaries_are_returned_only_with_the_tuning():
    tuned, grown = run({})
    if not tuned:
        pytest.skip("not glibc")
    assert grown < 16  # MiB: only the 2 MiB still alive
    off, grown_off = run({"DSINFER_MALLOC_TUNING": "0"})
    assert not off and grown_off > 100  # the plain path: 128 MiB stays on the heap behind the last chunk
