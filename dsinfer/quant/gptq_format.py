"""The GPTQ checkpoint layout used on the Hugging Face hub (AutoGPTQ / GPTQModel, `quant_method: gptq`).

For a linear layer X with weight [N, K] and `bits` b (4 or 8), f = 32 // b values per int32:
- X.qweight int32 [K / f, N]: input row i of output column j sits in qweight[i // f, j] at bit b * (i % f).
- X.qzeros  int32 [G, N / f]: the zero point of group g, column j, in qzeros[g, j // f] at bit b * (j % f).
  The original format ("gptq", v1) stores zero - 1; "gptq_v2" stores the zero itself.
- X.scales  fp16  [G, N] and X.g_idx int32 [K] (the group of each input row; not i // group_size when the
  checkpoint was quantized in activation order, desc_act).
- W[j, i] = scales[g_idx[i], j] * (q[i, j] - zero[g_idx[i], j]).
"""
import torch

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def check_gptq_config(qc: dict) -> tuple[int, int]:
    """Returns (bits, group_size) of a loadable GPTQ quantization_config, or raises naming the problem."""
    bits, group = qc.get("bits"), qc.get("group_size", -1)
    if bits not in (4, 8):
        raise ValueError(f"quantization_config.bits is {bits!r}; dsinfer loads 4- and 8-bit GPTQ checkpoints")
    if not isinstance(group, int) or (group < 1 and group != -1):
        raise ValueError(f"quantization_config.group_size must be -1 or a positive int, got {group!r}")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"quantization_config.checkpoint_format {fmt!r} is not supported; expected gptq or gptq_v2")
    return bits, group


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> [R * f, C]: the values packed along dim 0."""
    f, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, f, 1)
    return ((packed.unsqueeze(1) >> shifts) & mask).flatten(0, 1)


def _unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    f, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, 1, f)
    return ((packed.unsqueeze(2) >> shifts) & mask).flatten(1, 2)


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    f = 32 // bits
    rows = -(-values.shape[0] // f) * f
    v = torch.nn.functional.pad(values.to(torch.int64), (0, 0, 0, rows - values.shape[0])).view(-1, f, values.shape[1])
    shifts = torch.arange(0, 32, bits, dtype=torch.int64).view(1, f, 1)
    packed = (v << shifts).sum(1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def _pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    return _pack_rows(values.t(), bits).t().contiguous()


def bits_of(qweight_shape, k: int) -> int:
    return 32 * qweight_shape[0] // k


def read_layer(t: dict[str, torch.Tensor], qc: dict, n: int, k: int, name: str):
    """One layer's GPTQ tensors for an [N, K] weight under quantization_config qc, checked -> (bits, group size,
    codes, scales, mins, perm) as `unpack` gives them; ValueError names the tensor that does not fit."""
    bits = bits_of(t["qweight"].shape, k)
    group = k if qc.get("group_size", -1) == -1 else min(qc["group_size"], k)
    ng = -(-k // group)
    for key, shape in (("qweight", (k * bits // 32, n)), ("scales", (ng, n))):
        if tuple(t[key].shape) != shape or bits not in (4, 8):
            raise ValueError(f"{name}.{key} has shape {tuple(t[key].shape)}, expected {shape} for a {n}x{k} "
                             f"weight in {qc.get('bits')}-bit groups of {group}")
    return (bits, group, *unpack(t, bits, group, n, k, qc.get("checkpoint_format") == "gptq_v2", name))


def unpack(t: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int, v2: bool, name: str):
    """GPTQ tensors of one layer -> (codes int8 [N, K], scales [N, G], mins [N, G] or None, perm [K] or None)
    in dsinfer's form W = scales * code + mins, code = q - 2^(b-1), with columns reordered by `perm` so that
    each group is contiguous."""
    off, mask = 1 << (bits - 1), (1 << bits) - 1
    q = _unpack_rows(t["qweight"], bits)[:k]                          # [K, N]
    zeros = _unpack_cols(t["qzeros"], bits)[:, :n]                   # [G, N]
    zeros = zeros if v2 else (zeros + 1) & mask
    scales = t["scales"].float()
    g_idx = t["g_idx"].long() if "g_idx" in t else torch.arange(k) // group_size
    perm = None
    natural = torch.arange(k) // group_size
    if not torch.equal(g_idx, natural):
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], natural):
            raise ValueError(f"{name}.g_idx does not give each group {group_size} input rows")
        q = q[perm]
    mins = scales * (off - zeros)
    return ((q - off).t().to(torch.int8).contiguous(), scales.t().contiguous(),
            None if bool((zeros == off).all()) else mins.t().contiguous(), perm)


def pack(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """dsinfer's symmetric codes [N, K] and scales [N, G] -> the four GPTQ tensors (v1 zero points)."""
    n, k = codes.shape
    off = 1 << (bits - 1)
    q = (codes.to(torch.int32) + off).t()
    zeros = torch.full((scales.shape[1], n), off - 1, dtype=torch.int32)
    return {"qweight": _pack_rows(q, bits), "qzeros": _pack_cols(zeros, bits),
            "scales": scales.t().to(torch.float16).contiguous(),
            "g_idx": (torch.arange(k, dtype=torch.int32) // group_size)}
