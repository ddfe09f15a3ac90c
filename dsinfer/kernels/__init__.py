"""Small CPU kernels built on first use with the system C compiler (AVX2 + FMA), loaded with ctypes.

`gemv` computes x @ W.T for decode-sized batches (at most MAX_M rows), reading each weight row once for all
rows; torch's own matmul reads the weights at a fraction of memory bandwidth for such shapes. Where the
kernel cannot be built (no compiler, no AVX2) or is switched off (DSINFER_CPU_KERNELS=0, or
dsinfer.kernels.set_enabled(False)), callers use torch's path, which is also what the tests compare against."""
import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("dsinfer")
MAX_M = 8
SOURCE = Path(__file__).with_name("gemv_avx2.c")
_state = {"enabled": os.environ.get("DSINFER_CPU_KERNELS", "1") != "0", "lib": None, "tried": False}


def set_enabled(on: bool):
    _state["enabled"] = on


def cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2 " in flags and " fma " in flags


def build() -> ctypes.CDLL | None:
    """Compiles the kernel once per source version into a user cache directory; None if it cannot."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("DSINFER_CACHE", Path.home() / ".cache" / "dsinfer"))
    target = cache / f"gemv_avx2-{digest}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / target.name
            cmd = [os.environ.get("CC", "cc"), "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC",
                   str(SOURCE), "-o", str(out)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            out.replace(target)
    lib = ctypes.CDLL(str(target))
    for name in ("gemv_f32", "gemv_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        fn.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    if not _state["tried"]:
        _state["tried"] = True
        if cpu_has_avx2():
            try:
                _state["lib"] = build()
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("CPU kernels unavailable (%s); using torch's matmul", exc)
    return _state["lib"]


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (_state["enabled"] and x.device.type == "cpu" and x.dim() == 2 and 0 < x.shape[0] <= MAX_M
            and x.dtype == torch.float32 and w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous()
            and library() is not None)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 (M <= MAX_M), w [N, K] fp32 or bf16, contiguous -> x @ w.T in fp32."""
    x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    fn = library().gemv_f32 if w.dtype == torch.float32 else library().gemv_bf16
    fn(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
    return y
