"""Matmul kernels: `gemv` computes x @ W.T for decode-sized batches (at most MAX_M rows), reading each weight row
once for all rows (torch's own matmul reads the weights at a fraction of memory bandwidth for such shapes);
`gemm_small` does it for up to SMALL_MAX_M rows (a prefill's per-expert matmuls, where MKL's sgemm is not yet at
its large-matrix speed); `qgemv` does it for weight-only quantized weights (int8 / int4 codes in groups, see
dsinfer/quant/qtensor.py), and `dequant` expands a range of their rows to fp32 or bf16 for prefill.

With int8 activations, `qgemv` first quantizes x to int8 (per row, one fp32 scale per block of 32 columns:
d = max|x| / 127) and runs the dot products in integers, as llama.cpp does for Q4_0 x Q8_0: faster, at the cost
of x's rounding error. Shapes where a block of 32 columns would straddle a group (int8) or a half-group (int4)
take the fp32 path. The `*_usable` predicates say whether a kernel takes given shapes; whether a layer uses
the kernels at all is its KernelConfig's business (config.py)."""
import torch

from dsinfer.kernels.lib import library, ptr

MAX_M = 8  # the most rows of x a decode matmul takes (the kernels' plain steps)
WIDE_M = 16  # the most rows gemv's C entry reads the weights once for (a fused step's 9-16 tokens)
SMALL_MAX_M = 64  # the most rows of x gemm_small takes


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 2 and 0 < x.shape[0] <= MAX_M
            and x.dtype == torch.float32 and w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous()
            and library() is not None)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 (M <= WIDE_M), w [N, K] fp32 or bf16, contiguous -> x @ w.T in fp32."""
    x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    fn = library().gemv_f32 if w.dtype == torch.float32 else library().gemv_bf16
    fn(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
    return y


def small_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `gemm_small` takes x @ w.T: fp32 x on CPU with MAX_M < M <= SMALL_MAX_M rows (fewer go to `gemv`),
    fp32 contiguous w, library built."""
    return (x.device.type == "cpu" and x.dim() == 2
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


def q_usable(x: torch.Tensor, most: int = MAX_M) -> bool:
    """Whether `qgemv` takes x: decode-sized fp32 on CPU, library built (most: more rows, for in_row_chunks)."""
    return (x.device.type == "cpu" and x.dim() == 2 and 0 < x.shape[0] <= most
            and x.dtype == torch.float32 and library() is not None)


def in_row_chunks(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for x of any number of rows, where fn takes at most MAX_M: MAX_M rows at a time."""
    if x.shape[0] <= MAX_M:
        return fn(x)
    return torch.cat([fn(rows) for rows in x.split(MAX_M)])


def dequant_usable(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and library() is not None


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
          group_size: int, int8_activations: int = 0) -> torch.Tensor:
    """x [M, K] fp32 (M <= MAX_M) @ W.T for a quantized W [N, K] (codes q, scales / mins [N, groups]) -> fp32.
    int8_activations: 0 the fp32 path; 1 the integer path where the shape allows it, 2 the same with AVX-VNNI, 3
    with AVX512-VNNI (KernelConfig.int8_kernel; the caller knows the CPU has it)."""
    if x.dtype != torch.float32 or x.dim() != 2 or not 0 < x.shape[0] <= MAX_M:
        raise ValueError(f"qgemv takes fp32 [M <= {MAX_M}, K] activations, not {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    q, scales, mins = _quantized(q, scales, mins, bits, k, group_size)
    y = torch.empty(m, q.shape[0], dtype=torch.float32)
    fn = _qgemv_fn(bits, k, group_size, int8_activations)
    fn(x.data_ptr(), q.data_ptr(), scales.data_ptr(), ptr(mins), y.data_ptr(), m, q.shape[0], k, group_size,
       torch.get_num_threads())
    return y


def _qgemv_fn(bits: int, k: int, group_size: int, int8_activations: int):
    lib = library()
    if int8_activations and int8_activations_fit(bits, k, group_size):
        return {(8, 1): lib.qgemv_i8_x8, (4, 1): lib.qgemv_i4_x8, (8, 2): lib.qgemv_i8_x8_vnni,
                (4, 2): lib.qgemv_i4_x8_vnni, (8, 3): lib.qgemv_i8_x8_vnni512,
                (4, 3): lib.qgemv_i4_x8_vnni512}[bits, int(int8_activations)]
    return lib.qgemv_i8 if bits == 8 else lib.qgemv_i4


def qgemv_for(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int, group_size: int, k: int,
              int8_activations: int = 0):
    """qgemv for one quantized W [N, K] used at every step (the MTP draft's), its checks and kernel choice made
    once: a function of fp32 contiguous x [M <= MAX_M, K] (the caller's guarantee) giving qgemv's numbers."""
    q, scales, mins = _quantized(q, scales, mins, bits, k, group_size)
    fn, n = _qgemv_fn(bits, k, group_size, int8_activations), q.shape[0]
    addresses = (q.data_ptr(), scales.data_ptr(), ptr(mins))

    def run(x: torch.Tensor, keep=(q, scales, mins)) -> torch.Tensor:
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        fn(x.data_ptr(), *addresses, y.data_ptr(), x.shape[0], n, k, group_size, torch.get_num_threads())
        return y
    return run


DEQUANT_DTYPES = (torch.float32, torch.bfloat16)


def dequant(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int, group_size: int, k: int,
            n0: int = 0, n1: int | None = None, out: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows n0..n1 of the quantized W [N, K], [n1 - n0, K] in fp32, or in bf16 (each fp32 value rounded to
    nearest even), into `out` if given (contiguous, of that dtype)."""
    q, scales, mins = _quantized(q, scales, mins, bits, k, group_size)
    n1 = q.shape[0] if n1 is None else n1
    if not 0 <= n0 <= n1 <= q.shape[0]:
        raise ValueError(f"rows {n0}..{n1} of a matrix with {q.shape[0]}")
    if dtype not in DEQUANT_DTYPES:
        raise ValueError(f"dequant writes float32 or bfloat16, not {dtype}")
    if out is None:
        out = torch.empty(n1 - n0, k, dtype=dtype)
    elif out.shape != (n1 - n0, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {dtype} [{n1 - n0}, {k}]")
    lib, bf16 = library(), dtype == torch.bfloat16
    fn = {(8, False): lib.dequant_i8, (4, False): lib.dequant_i4, (8, True): lib.dequant_i8_bf16,
          (4, True): lib.dequant_i4_bf16}[bits, bf16]
    fn(q.data_ptr(), scales.data_ptr(), ptr(mins), out.data_ptr(), k, group_size, n0, n1, torch.get_num_threads())
    return out


def round_to_int8(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 (K a multiple of 32) rounded exactly as the integer path quantizes it: d * xq per block of
    32 values, d = max|x| / 127."""
    x = x.contiguous()
    out = torch.empty_like(x)
    library().round_x_i8(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads())
    return out
