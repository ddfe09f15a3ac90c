"""Reading one rank's slice of each checkpoint tensor (safetensors' get_slice: only those bytes are read). The
slice is found by comparing the tensor's shape in the file with the rank's parameter: they differ in at most
one dim, by the group's size, and the rank takes its contiguous part of it. FP8 weights are sliced with their
scale tiles; weights quantized on load whose groups span whole rows are quantized over the full row first, so
that every rank's scales are those one process would compute."""
import torch

from dsinfer.layers.parallel import Shard
from dsinfer.quant import gptq_format
from dsinfer.quant.fp8 import FP8_DTYPES
from dsinfer.quant.qtensor import QTensor


class ShardError(ValueError):
    """A checkpoint tensor that cannot be split as the model is."""


def split_of(full: list[int], dest: tuple[int, ...], shard: Shard, name: str) -> tuple[int, int, int] | None:
    """(dim, start, stop) of this rank's part of a tensor of shape `full` for a parameter of shape `dest`, or None
    when the rank holds it whole."""
    differ = [d for d, (f, n) in enumerate(zip(full, dest)) if f != n]
    if not differ and len(full) == len(dest):
        return None
    if len(full) != len(dest) or len(differ) != 1 or full[differ[0]] != dest[differ[0]] * shard.size:
        raise ShardError(f"tensor {name} has shape {tuple(full)}, which does not split into this rank's "
                         f"{tuple(dest)} over {shard.size} ranks")
    d = differ[0]
    return d, shard.rank * dest[d], (shard.rank + 1) * dest[d]


def index(split: tuple[int, int, int]) -> tuple[slice, ...]:
    dim, start, stop = split
    return (slice(None),) * dim + (slice(start, stop),)


def dequantize_fp8_part(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], full: list[int],
                        split: tuple[int, int, int] | None, name: str) -> torch.Tensor:
    """A slice of an FP8 weight times its tiles' scales: W = fp8 * scale_inv[i // bo, j // bi] (edge tiles partial)."""
    bo, bi = block
    expected = (-(-full[0] // bo), -(-full[1] // bi))
    if tuple(scale_inv.shape) != expected:
        raise ShardError(f"{name}_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{full[0]}x{full[1]} weight in {bo}x{bi} blocks")
    rows, cols = (0, full[0]), (0, full[1])
    if split is not None:
        rows, cols = ((split[1], split[2]), cols) if split[0] == 0 else (rows, (split[1], split[2]))
    s = scale_inv.float()[rows[0] // bo:-(-rows[1] // bo), cols[0] // bi:-(-cols[1] // bi)]
    s = s.repeat_interleave(bo, 0)[rows[0] % bo:][:rows[1] - rows[0]]
    s = s.repeat_interleave(bi, 1)[:, cols[0] % bi:][:, :cols[1] - cols[0]]
    return weight.float() * s


def read_part(handles, file: str, name: str, dest, shard: Shard, scale=None, block=None,
              group: int | None = None) -> torch.Tensor:
    """This rank's part of tensor `name` in `file` for parameter `dest`. scale: a callable giving the tensor's
    fp8 scale_inv (whole: it is tiny) if the tensor turns out to be fp8. group: the group size asked for when
    quantizing on load (-1: whole rows)."""
    full = handles.shape(file, name)
    split = split_of(full, tuple(dest.shape), shard, name)
    whole_rows = isinstance(dest, QTensor) and split is not None and split[0] == len(full) - 1
    if split is None or whole_rows and whole_row_groups(dest, full, group):
        t = handles.get(file, name)  # whole; a quantized one is cut by store_part after quantizing full rows
    else:
        t = handles.get(file, name, index(split))
    if t.dtype in FP8_DTYPES and scale is not None:
        return dequantize_fp8_part(t, scale(), block, full, split, name)
    return t


def whole_row_groups(dest: QTensor, full: list[int], group: int | None) -> bool:
    """Whether one process would quantize this weight in groups of whole rows, longer than this rank's part."""
    if group is None:
        return False
    whole = full[-1] if group in (-1, 0) else min(group, full[-1])
    return whole == full[-1] > dest.k


def store_part(dest: QTensor, src: torch.Tensor, shard: Shard):
    """Quantizes src into dest: directly when it is dest's shape, else (a whole-row-group weight split by input)
    over the full rows, keeping this rank's codes with the rows' scales."""
    if tuple(src.shape) == tuple(dest.shape):
        return dest.store(src)
    k = dest.k
    whole = QTensor.empty(tuple(src.shape), dest.bits, src.shape[-1])
    whole.store(src)
    codes = whole.codes()[..., shard.rank * k:(shard.rank + 1) * k]
    dest.store_codes(codes, whole.scales)


def gptq_part(t: dict[str, torch.Tensor], qc: dict, n: int, k: int, shard: Shard, name: str):
    """read_layer's (bits, group, codes, scales, mins, perm) for this rank's [n, k] part of a GPTQ layer read
    whole: rows for a split output, columns (with their groups' scales) for a split input. A split input needs
    groups that the split does not cut, and no activation order (its groups are spread over all columns)."""
    n_full = t["qweight"].shape[1]
    k_full = len(t["g_idx"]) if "g_idx" in t else t["qweight"].shape[0] * 32 // qc["bits"]
    bits, group, codes, scales, mins, perm = gptq_format.read_layer(t, qc, n_full, k_full, name)
    if n_full != n:
        split = split_of([n_full, k_full], (n, k), shard, name + ".qweight")
        rows = slice(split[1], split[2])
        return bits, group, codes[rows], scales[rows], None if mins is None else mins[rows], perm
    if k_full == k:
        return bits, group, codes, scales, mins, perm
    split_of([n_full, k_full], (n, k), shard, name + ".qweight")
    k0 = shard.rank * k
    if perm is not None:
        raise ShardError(f"{name} is GPTQ-quantized in activation order (desc_act), whose groups span all input "
                         "columns; it cannot be split by input over ranks")
    if group == k_full:  # one group per row: every rank keeps the row's scale
        return bits, k, codes[:, k0:k0 + k], scales, mins, None
    if k0 % group or k % group:
        raise ShardError(f"{name}: groups of {group} input columns are cut by the split into {k} per rank")
    g = slice(k0 // group, (k0 + k) // group)
    return bits, group, codes[:, k0:k0 + k], scales[:, g], None if mins is None else mins[:, g], None


def read_gptq_part(read, shape, qc: dict, n: int, k: int, shard: Shard, name: str):
    """gptq_part's result, reading only this rank's slices of the layer's GPTQ tensors: read(suffix, index=None)
    gives a tensor (or its [index] part), shape(suffix) its shape in the file (None if absent). g_idx is read
    whole (one int per input). Falls back to reading whole where a slice would cut a packed int32."""
    has_g_idx = shape("g_idx") is not None
    n_full, rows = shape("qweight")[1], shape("qweight")[0]
    k_full = shape("g_idx")[0] if has_g_idx else rows * 32 // qc["bits"]
    split = split_of([n_full, k_full], (n, k), shard, name + ".qweight")
    bits = gptq_format.bits_of((rows,), k_full) if k_full else 0
    per, start = 32 // bits if bits in (4, 8) else 0, split[1] if split else 0  # per: values in an int32
    if split is None or not per or start % per or (n if split[0] == 0 else k) % per:
        whole = {s: read(s) for s in gptq_format.SUFFIXES if shape(s) is not None}
        return gptq_part(whole, qc, n, k, shard, name)
    t = {"g_idx": read("g_idx")} if has_g_idx else {}
    if split[0] == 0:  # output rows: columns of qweight, scales and (packed) qzeros
        cols = (slice(None), slice(start, start + n))
        t.update(qweight=read("qweight", cols), scales=read("scales", cols),
                 qzeros=read("qzeros", (slice(None), slice(start // per, (start + n) // per))))
        return gptq_format.read_layer(t, qc, n, k_full, name)
    return _gptq_input_part(read, t, qc, n, k, k_full, start, per, name)


def _gptq_input_part(read, t: dict, qc: dict, n: int, k: int, k_full: int, k0: int, per: int, name: str):
    """read_gptq_part for a layer split by input: rows k0 .. k0 + k - 1 of qweight, with their groups."""
    group = k_full if qc.get("group_size", -1) == -1 else min(qc["group_size"], k_full)
    natural = torch.arange(k_full) // group
    if "g_idx" in t and not torch.equal(t["g_idx"].long(), natural):
        raise ShardError(f"{name} is GPTQ-quantized in activation order (desc_act), whose groups span all input "
                         "columns; it cannot be split by input over ranks")
    qweight = read("qweight", (slice(k0 // per, (k0 + k) // per), slice(None)))
    if group == k_full:  # one group per row: every rank keeps the row's scale
        t.update(qweight=qweight, scales=read("scales"), qzeros=read("qzeros"), g_idx=torch.zeros(k, dtype=torch.int32))
        return gptq_format.read_layer(t, dict(qc, group_size=-1), n, k, name)
    if k0 % group or k % group:
        raise ShardError(f"{name}: groups of {group} input columns are cut by the split into {k} per rank")
    g = (slice(k0 // group, (k0 + k) // group), slice(None))
    t.update(qweight=qweight, scales=read("scales", g), qzeros=read("qzeros", g),
             g_idx=natural[k0:k0 + k].to(torch.int32) - k0 // group)
    return gptq_format.read_layer(t, qc, n, k, name)
