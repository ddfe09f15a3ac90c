"""glibc malloc and the large temporaries of a forward pass.

glibc serves blocks above a threshold with their own memory mappings, returned to the system when freed, and
the rest from its heap. The threshold starts at 128 KiB and rises to the size of any mapped block that is freed
(up to 32 MiB), so after loading, activations of up to 32 MiB come from the heap; its free space fragments, is
not given back, and resident memory grows well past the tensors alive (about 80 MiB of 2.4 GB on V2-Lite's
shapes). Fixing the threshold also stops it rising: every block of 1 MiB or more is mapped and returned when
freed. Switch: DSINFER_MALLOC_TUNING=0 (and an explicit MALLOC_MMAP_THRESHOLD_ is left alone)."""
import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("dsinfer")
M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
THRESHOLD = 1 << 20


def tune(threshold: int = THRESHOLD) -> bool:
    """Fixes glibc's mmap threshold for this process; False where switched off, overridden or not glibc."""
    if os.environ.get("DSINFER_MALLOC_TUNING", "1") == "0" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) failed; resident memory may grow with heap fragmentation", threshold)
    return ok
