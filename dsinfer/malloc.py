"""How the process's memory is laid out: the heap after loading, and huge pages under the weights.

Loading frees many large temporaries (tensors widened or quantized a slice at a time). glibc serves blocks above
a threshold with their own mappings, but the threshold rises to the size of any such block freed (up to 32 MiB),
so most of these temporaries end up on the heap, whose free space is not given back while anything above it
lives: about 70 MiB of V2-Lite's int8 load stays resident for nothing. `trim()` after loading returns it
(malloc_trim). Fixing the threshold instead would return every later temporary too, but fresh mappings must be
faulted in and zeroed on every use: prefill ran 20-35% slower that way. Switch: DSINFER_MALLOC_TRIM=0.

Weights go on transparent huge pages where the system gives them on request (transparent_hugepage set to
madvise or always): decode streams every weight once per step, and with 4 KiB pages the TLB misses on the way cost
bandwidth (the fp32 kernel on a 10944 x 2048 matrix: 30 -> 34 GB/s at 1 row, 23 -> 26 at 8). Switch:
DSINFER_HUGEPAGES=0."""
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterable

import torch

MADV_HUGEPAGE = 14  # madvise advice in Linux's mman.h
HUGE = 2 << 20


def trim() -> bool:
    """Gives the heap's free memory back to the system; False where switched off or not glibc."""
    fn = getattr(_libc(), "malloc_trim", None) if os.environ.get("DSINFER_MALLOC_TRIM", "1") != "0" else None
    if fn is None:
        return False
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    fn(0)
    return True


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def hugepages_enabled() -> bool:
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False
    return os.environ.get("DSINFER_HUGEPAGES", "1") != "0" and "[never]" not in mode


def advise_hugepages(tensors: Iterable[torch.Tensor]) -> int:
    """Asks for huge pages under every CPU tensor of 4 MiB (two huge pages) or more; call it before the
    tensors are first written (the pages are chosen when first touched). Returns the bytes advised."""
    libc = _libc() if hugepages_enabled() else None
    if libc is None:
        return 0
    libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    done = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() * t.element_size() < 2 * HUGE:
            continue
        start = -(-t.data_ptr() // HUGE) * HUGE  # whole huge pages inside the tensor
        end = (t.data_ptr() + t.numel() * t.element_size()) // HUGE * HUGE
        if end > start and libc.madvise(start, end - start, MADV_HUGEPAGE) == 0:
            done += end - start
    return done
