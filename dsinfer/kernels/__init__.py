"""Small CPU kernels built on first use with the system C compiler (AVX2 + FMA), loaded with ctypes.

`gemv` computes x @ W.T for decode-sized batches (at most MAX_M rows), reading each weight row once for all
rows; torch's own matmul reads the weights at a fraction of memory bandwidth for such shapes. `gemm_small` does
it for up to SMALL_MAX_M rows (a prefill's per-expert matmuls; gemm_small_avx2.c), where MKL's sgemm is not yet
at its large-matrix speed (benchmarks/gemm_small.py). `qgemv` does the
same for weight-only quantized weights (int8 / int4 codes in groups, see dsinfer/quant/qtensor.py), and
`dequant` expands a range of their rows to fp32 for prefill. `mla_decode` is MLA's absorbed decode attention over
the latent cache (mla_decode_avx2.c), reading each cached row once for all heads; `moe_decode` runs a decode batch's
experts in one call; `route` is the MoE router; `rms_norm` and `mla_rope_cache` fuse elementwise steps that torch
would run as several ops (on this CPU each torch op costs microseconds of dispatch, which is a small model's step). `moe_decode` runs a MoE
layer's routed experts for a few tokens in one call (moe_decode_avx2.c), reading each active expert's weights
once. Where the kernels cannot be built (no compiler, no AVX2) or are switched off (DSINFER_CPU_KERNELS=0, or
dsinfer.kernels.set_enabled(False)), callers use torch's path, which is also what the tests compare against.

With int8 activations on (DSINFER_INT8_ACTIVATIONS=1 at import, or set_int8_activations(True); off by default),
`qgemv` first quantizes x to int8 (per row, one fp32 scale per block of 32 columns: d = max|x| / 127) and runs
the dot products in integers, as llama.cpp does for Q4_0 x Q8_0: faster, at the cost of x's rounding error.
Shapes where a block of 32 columns would straddle a group (int8) or a half-group (int4) take the fp32 path."""
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
SOURCES = [Path(__file__).with_name(name) for name in ("gemv_avx2.c", "qgemv_avx2.c", "qgemv_x8_avx2.c",
                                                      "mla_decode_avx2.c", "moe_decode_avx2.c", "fused_avx2.c",
                                                      "router_avx2.c", "decode_layer.c", "gemm_small_avx2.c",
                                                      "moe_prefill_avx2.c")]
HEADERS = [Path(__file__).with_name(name) for name in ("qkernels.h", "gemv_kernels.h", "simd.h", "panel.h")]


def int8_activations_from_env() -> bool:
    """DSINFER_INT8_ACTIVATIONS: 0 turns the int8-activation path off at import; 1 or unset leaves it on."""
    value = os.environ.get("DSINFER_INT8_ACTIVATIONS", "1").strip()
    if value not in ("0", "1"):
        log.warning("DSINFER_INT8_ACTIVATIONS=%r is neither 0 nor 1; int8 activations stay on", value)
    return value != "0"


_state = {"enabled": os.environ.get("DSINFER_CPU_KERNELS", "1") != "0", "lib": None, "tried": False,
          "int8_activations": int8_activations_from_env(),
          "small_gemm": os.environ.get("DSINFER_SMALL_GEMM", "1") != "0",
          "moe_prefill": os.environ.get("DSINFER_MOE_PREFILL", "1") != "0"}
SMALL_MAX_M = 64  # the most rows of x gemm_small takes


def set_enabled(on: bool):
    _state["enabled"] = on


def enabled() -> bool:
    """Whether dsinfer's own CPU paths are on (DSINFER_CPU_KERNELS / set_enabled), built or not."""
    return _state["enabled"]


def set_small_gemm(on: bool):
    """Whether `linear` sends fp32 batches of MAX_M < M <= SMALL_MAX_M rows to `gemm_small` (DSINFER_SMALL_GEMM=0
    at import turns it off); off as well while the kernels are."""
    _state["small_gemm"] = bool(on)


def set_int8_activations(on: bool):
    """Whether `qgemv` quantizes x to int8 and multiplies in integers where the shape allows (see above)."""
    _state["int8_activations"] = bool(on)


def int8_activations_enabled() -> bool:
    return _state["int8_activations"]


def cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2 " in flags and " fma " in flags


def build() -> ctypes.CDLL | None:
    """Compiles the kernels once per source version into a user cache directory; None if it cannot."""
    digest = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES + HEADERS)).hexdigest()[:16]
    cache = Path(os.environ.get("DSINFER_CACHE", Path.home() / ".cache" / "dsinfer"))
    target = cache / f"gemv_avx2-{digest}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / target.name
            cmd = [os.environ.get("CC", "cc"), "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC",
                   *map(str, SOURCES), "-o", str(out), "-lm"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            out.replace(target)
    lib = ctypes.CDLL(str(target))
    for name in ("gemv_f32", "gemv_bf16", "gemm_small_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        fn.restype = None
    # x, q, scales, mins, y, m, n, k, group size, threads; _x8: int8 activations
    for name in ("qgemv_i8", "qgemv_i4", "qgemv_i8_x8", "qgemv_i4_x8"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        fn.restype = None
    lib.round_x_i8.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.round_x_i8.restype = None
    for name in ("dequant_i8", "dequant_i4"):  # q, scales, mins, out, k, group size, n0, n1, threads
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        fn.restype = None
    declare(lib)
    declare_prefill(lib)
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


def small_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `gemm_small` takes x @ w.T: fp32 x on CPU with MAX_M < M <= SMALL_MAX_M rows (fewer go to `gemv`),
    fp32 contiguous w, kernels and the small-GEMM switch on (DSINFER_SMALL_GEMM=0 turns it off)."""
    return (_state["enabled"] and _state["small_gemm"] and x.device.type == "cpu" and x.dim() == 2
            and MAX_M < x.shape[0] <= SMALL_MAX_M and x.dtype == torch.float32 and w.dtype == torch.float32
            and w.dim() == 2 and w.shape[1] == x.shape[1] and w.is_contiguous() and library() is not None)


def gemm_small(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 (1 <= M <= SMALL_MAX_M), w [N, K] fp32 contiguous -> x @ w.T [M, N] in fp32: a prefill's
    per-expert matmul, x packed once and each weight row's piece reused from L1 by all of x's rows."""
    if x.dtype != torch.float32 or x.dim() != 2 or not 0 < x.shape[0] <= SMALL_MAX_M:
        raise ValueError(f"gemm_small takes fp32 [M <= {SMALL_MAX_M}, K] activations, not {x.dtype} {tuple(x.shape)}")
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] != x.shape[1] or not w.is_contiguous():
        raise ValueError(f"gemm_small takes a contiguous fp32 [N, {x.shape[1]}] weight, not {w.dtype} {tuple(w.shape)}")
    x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if n and k:
        library().gemm_small_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
    else:
        y.zero_()
    return y


def q_usable(x: torch.Tensor) -> bool:
    """Whether `qgemv` takes x: decode-sized fp32 on CPU, kernels on and built."""
    return (_state["enabled"] and x.device.type == "cpu" and x.dim() == 2 and 0 < x.shape[0] <= MAX_M
            and x.dtype == torch.float32 and library() is not None)


def dequant_usable(q: torch.Tensor) -> bool:
    return _state["enabled"] and q.device.type == "cpu" and library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _quantized(q, scales, mins, bits: int, k: int, group_size: int):
    """The codes and per-group tensors, contiguous, after checking that they describe an [N, K] matrix."""
    n, ng = q.shape[0], -(-k // group_size) if group_size > 0 else 0
    qtype, qcols = (torch.int8, k) if bits == 8 else (torch.uint8, k // 2)
    fine = (bits in (4, 8) and k > 0 and k % 2 == 0 and group_size > 0 and q.device.type == "cpu"
            and (bits == 8 or group_size % 2 == 0 or group_size >= k)  # int4 groups split in halves
            and q.dtype == qtype and q.shape == (n, qcols) and scales.dtype == torch.float32
            and scales.shape == (n, ng) and (mins is None or (mins.dtype == torch.float32 and mins.shape == (n, ng))))
    if not fine:
        raise ValueError(f"not int{bits} codes of a [{n}, {k}] matrix in groups of {group_size}: codes {q.dtype} "
                         f"{tuple(q.shape)} on {q.device}, scales {scales.dtype} {tuple(scales.shape)}")
    return q.contiguous(), scales.contiguous(), None if mins is None else mins.contiguous()


def int8_activations_fit(bits: int, k: int, group_size: int) -> bool:
    """Whether the int8-activation path takes these shapes: every group's length (int8 codes) or half-length
    (int4) a multiple of 32, so that no block of 32 columns of x straddles two of them."""
    unit, g = (64 if bits == 4 else 32), min(group_size, k)
    return k > 0 and g > 0 and g % unit == 0 and k % g % unit == 0


def qgemv(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
          group_size: int, int8_activations: bool | None = None) -> torch.Tensor:
    """x [M, K] fp32 (M <= MAX_M) @ W.T for a quantized W [N, K] (codes q, scales / mins [N, groups]) -> fp32.
    int8_activations: None follows set_int8_activations; True / False forces the integer path (where the shape
    allows it) or the fp32 one."""
    if x.dtype != torch.float32 or x.dim() != 2 or not 0 < x.shape[0] <= MAX_M:
        raise ValueError(f"qgemv takes fp32 [M <= {MAX_M}, K] activations, not {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    q, scales, mins = _quantized(q, scales, mins, bits, k, group_size)
    y = torch.empty(m, q.shape[0], dtype=torch.float32)
    if int8_activations is None:
        int8_activations = _state["int8_activations"]
    lib = library()
    if int8_activations and int8_activations_fit(bits, k, group_size):
        fn = lib.qgemv_i8_x8 if bits == 8 else lib.qgemv_i4_x8
    else:
        fn = lib.qgemv_i8 if bits == 8 else lib.qgemv_i4
    fn(x.data_ptr(), q.data_ptr(), scales.data_ptr(), _ptr(mins), y.data_ptr(), m, q.shape[0], k, group_size,
       torch.get_num_threads())
    return y


def dequant(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int, group_size: int, k: int,
            n0: int = 0, n1: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows n0..n1 of the quantized W [N, K] in fp32, [n1 - n0, K] (into `out` if given, contiguous fp32)."""
    q, scales, mins = _quantized(q, scales, mins, bits, k, group_size)
    n1 = q.shape[0] if n1 is None else n1
    if not 0 <= n0 <= n1 <= q.shape[0]:
        raise ValueError(f"rows {n0}..{n1} of a matrix with {q.shape[0]}")
    if out is None:
        out = torch.empty(n1 - n0, k, dtype=torch.float32)
    elif out.shape != (n1 - n0, k) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous fp32 [{n1 - n0}, {k}]")
    fn = library().dequant_i8 if bits == 8 else library().dequant_i4
    fn(q.data_ptr(), scales.data_ptr(), _ptr(mins), out.data_ptr(), k, group_size, n0, n1, torch.get_num_threads())
    return out


def round_to_int8(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 (K a multiple of 32) rounded exactly as the integer path quantizes it: d * xq per block of
    32 values, d = max|x| / 127."""
    x = x.contiguous()
    out = torch.empty_like(x)
    library().round_x_i8(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads())
    return out


from dsinfer.kernels.decode import (absorb_usable, declare, fused_usable, mla_absorb, mla_decode,  # noqa: E402
                                   mla_expand, mla_rope_cache, mla_usable, moe_decode, moe_usable, rms_norm, route,
                                   route_usable)
from dsinfer.kernels.prefill import declare_prefill, moe_prefill, moe_prefill_usable, set_moe_prefill  # noqa: E402
