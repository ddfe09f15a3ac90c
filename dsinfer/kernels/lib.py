"""The C kernels' shared library: compiled once per source version with the system C compiler (AVX2 + FMA,
OpenMP), cached under ~/.cache/dsinfer (or $DSINFER_CACHE), loaded with ctypes, and its entry points declared.
`library()` is None where it cannot be built (no compiler, no AVX2); callers then run the torch path."""
import ctypes
import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from dsinfer.kernels.decode_layer import check_layout

log = logging.getLogger("dsinfer")
HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("gemv_avx2.c", "qgemv_avx2.c", "qgemv_x8_avx2.c", "mla_decode_avx2.c",
                                    "moe_decode_avx2.c", "fused_avx2.c", "router_avx2.c", "decode_layer.c",
                                    "decode_weights.c", "gemm_small_avx2.c", "moe_prefill_avx2.c", "qgemv_x8_vnni.c",
                                    "token_mask.c", "grouped_mm_amx.c", "dequant_avx2.c", "qgemv_x8_vnni512.c",
                                    "prefill_bf16_avx2.c", "decode_draft.c")]
HEADERS = [HERE / name for name in ("qkernels.h", "gemv_kernels.h", "simd.h", "panel.h", "decode_layer.h")]
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx_vnni",
             "amx_bf16", "amx_int8", "amx_tile")
P, I64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


@cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set extensions of this CPU that dsinfer cares about, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return frozenset(f for f in ISA_FLAGS if f in present)


@cache
def l2_bytes(default: int = 1 << 20) -> int:
    """The size of one core's L2 cache, from sysfs (`default` where it does not say)."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip()
                return int(size[:-1]) << {"K": 10, "M": 20}[size[-1]] if size[-1] in "KM" else int(size)
        except (OSError, ValueError):
            break
    return default


def cpu_has_avx2() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


def build() -> ctypes.CDLL:
    """Compiles the kernels once per source version into the cache directory and loads them."""
    compiler = os.environ.get("CC", "cc")  # may carry flags, e.g. CC="cc -DROW_PREFETCH=0"
    sources = b"".join(src.read_bytes() for src in SOURCES + HEADERS)
    digest = hashlib.sha256(sources + compiler.encode()).hexdigest()[:16]
    cache_dir = Path(os.environ.get("DSINFER_CACHE", Path.home() / ".cache" / "dsinfer"))
    target = cache_dir / f"gemv_avx2-{digest}.so"
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            out = Path(tmp) / target.name
            cmd = [*shlex.split(compiler), "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC",
                   *map(str, SOURCES), "-o", str(out), "-lm"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)  # ~20 s alone; far more on a busy machine
            out.replace(target)
    lib = ctypes.CDLL(str(target))
    declare(lib)
    return lib


@cache
def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None where it cannot be (the reason is logged once)."""
    if not cpu_has_avx2():
        return None
    try:
        lib = build()
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("CPU kernels unavailable (%s); using torch's ops", exc)
        return None
    check_layout(lib)  # the C structs must match their ctypes mirrors
    return lib


def _sig(lib: ctypes.CDLL, names: tuple[str, ...], args: list, res=None):
    for name in names:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


def declare(lib: ctypes.CDLL):
    """The argument types of every entry point (the comments name the C parameters in order)."""
    # x, w, y, m, n, k, threads
    _sig(lib, ("gemv_f32", "gemv_bf16", "gemm_small_f32"), [P] * 3 + [I64] * 3 + [INT])
    # x, q, scales, mins, y, m, n, k, group size, threads; _x8: int8 activations
    _sig(lib, ("qgemv_i8", "qgemv_i4", "qgemv_i8_x8", "qgemv_i4_x8", "qgemv_i8_x8_vnni", "qgemv_i4_x8_vnni",
                  "qgemv_i8_x8_vnni512", "qgemv_i4_x8_vnni512"),
         [P] * 5 + [I64] * 4 + [INT])
    _sig(lib, ("round_x_i8",), [P] * 2 + [I64] * 2 + [INT])
    # q, scales, mins, out (fp32 or bf16), k, group size, n0, n1, threads
    _sig(lib, ("dequant_i8", "dequant_i4", "dequant_i8_bf16", "dequant_i4_bf16"), [P] * 4 + [I64] * 4 + [INT])
    # q, cache, rows, seq, lens, out, t, h, r, dr, lmax, b, cache rows, scale, threads -> 0 or an error code
    _sig(lib, ("mla_decode_f32", "mla_decode_bf16", "mla_decode_fp8"), [P] * 6 + [I64] * 7 + [F32, INT], INT)
    _sig(lib, ("rms_norm_f32",), [P] * 3 + [I64] * 3 + [F32])
    # q, kv, norm weight, eps, cos/sin, cache, slots, t, h, dn, dr, r, cache rows -> 0 or 1 (bad slot)
    _sig(lib, ("mla_rope_cache_f32",), [P] * 3 + [F32] + [P] * 3 + [I64] * 6, INT)
    # x, ids, weights, gate_up, down, out, t, k, e, d, inter, threads -> 0 or an error code
    _sig(lib, ("moe_prefill_f32",), [P] * 6 + [I64] * 5 + [INT], INT)
    # ..., and the most tokens an expert's weights are read once for (8 to 16)
    _sig(lib, ("moe_decode_f32", "moe_decode_bf16"), [P] * 6 + [I64] * 5 + [INT, I64], INT)
    # x, weight, weight is bf16, bias, out weights, out ids, counts, t, d, e, top_k, n_group, topk_group, method,
    # sigmoid, norm_topk_prob, scale -> 0 or an error code
    _sig(lib, ("route_f32",), [P, P, INT] + [P] * 4 + [I64] * 6 + [INT] * 3 + [F32], INT)
    # q_nope, its (token, head) stride, q_pe, its stride, kv_b, qc, t, h, dn, dr, dv, r, threads
    _sig(lib, ("mla_absorb_f32", "mla_absorb_bf16"), [P, I64] * 2 + [P] * 2 + [I64] * 6 + [INT])
    # o_lat, kv_b, attn, t, h, dn, dv, r, threads
    _sig(lib, ("mla_expand_f32", "mla_expand_bf16"), [P] * 3 + [I64] * 5 + [INT])
    # layer, step (structs of decode_layer.py), x, cache, threads -> 0 or an error code
    _sig(lib, ("decode_layer_f32",), [P] * 4 + [INT], INT)
    # layer, step, x, cache, out, threads / layer, step, x, out, threads -> 0 or an error code (the halves)
    _sig(lib, ("decode_attention_f32",), [P] * 5 + [INT], INT)
    _sig(lib, ("decode_ffn_f32",), [P] * 4 + [INT], INT)
    # draft, layer, step, next ids, hidden, hidden is bf16, keep, kept, cache, out, logits, threads
    _sig(lib, ("decode_draft_f32",), [P] * 5 + [I64, P, I64] + [P] * 3 + [INT], INT)
    # which struct (0 Layer, 1 Step, 2 Mat, 3 Draft), out [n] -> how many values: sizeof, then each field's offset
    _sig(lib, ("decode_layer_layout",), [INT, P, I64], I64)
    _sig(lib, ("decode_layer_names",), [INT], ctypes.c_char_p)
    _sig(lib, ("decode_step_tokens",), [], I64)
    # x, offs, w, y, t, e, n, k, threads -> 0 or an error code; amx_init -> 0 if the OS grants the tile state
    _sig(lib, ("grouped_mm_amx_bf16",), [P] * 4 + [I64] * 4 + [INT], INT)
    _sig(lib, ("amx_init",), [], INT)
    # x, scale or NULL, out, t, inter, threads
    _sig(lib, ("silu_mul_bf16",), [P] * 3 + [I64] * 2 + [INT])
    # x, w, out, rows, n, x row stride, eps, threads
    _sig(lib, ("rms_norm_bf16",), [P] * 3 + [I64] * 3 + [F32, INT])
    # x, its token and head strides, cos pairs, signed sin pairs, out, t, h, dim, threads
    _sig(lib, ("rope_bf16",), [P, I64, I64] + [P] * 3 + [I64] * 3 + [INT])
    # logits, row stride, mask, rows, n, vocab, words
    _sig(lib, ("token_mask_f32",), [P, I64, P, P] + [I64] * 3)
    # scores, row stride, mask, rows, n, vocab, words, best [n]
    _sig(lib, ("token_argmax_f32",), [P, I64, P, P] + [I64] * 3 + [P])


def ptr(t) -> int | None:
    return None if t is None else t.data_ptr()
