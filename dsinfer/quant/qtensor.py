"""Weight-only quantized matrices: int8 or int4 codes with one fp32 scale (and optionally an offset) per group.

W[j, i] = scales[j, g] * code[j, i] + mins[j, g], g = i // group_size (the last group may be partial).
- int8: codes are int8 [.., N, K].
- int4: codes are stored as nibbles v = code + 8 in uint8 [.., N, K/2]. Within each group of g columns, byte t
  holds column t in its low nibble and column t + g/2 in its high one, so 8 bytes unpack to two runs of 8
  consecutive columns (see dsinfer/kernels/qgemv_avx2.c).
- `perm` (optional, [.., K]) reorders the input columns: y = x[:, perm] @ W.T. GPTQ checkpoints quantized in
  activation order use it so that their groups become contiguous.
"""
import torch

BITS = (4, 8)
STORE_VALUES = 1 << 22  # weights quantized per step when storing a large matrix


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def group_lengths(k: int, group_size: int) -> list[int]:
    full, rest = divmod(k, group_size)
    return [group_size] * full + ([rest] if rest else [])


def pack_int4(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes [.., N, K] in -8..7 -> uint8 [.., N, K/2] in the half-split layout."""
    v = (codes.to(torch.int16) + 8).to(torch.uint8)
    parts = []
    for chunk in v.split(group_size, dim=-1):
        low, high = chunk.chunk(2, dim=-1)
        parts.append(low | (high << 4))
    return torch.cat(parts, dim=-1)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 [.., N, K/2] -> int8 codes [.., N, K]."""
    parts = []
    for chunk in packed.split(group_size // 2, dim=-1):
        parts += [(chunk & 15), (chunk >> 4)]
    return (torch.cat(parts, dim=-1).to(torch.int8) - 8) if parts else packed.to(torch.int8)


def symmetric_scales(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """One scale per group. int8: absmax / 127. int4: the value of largest magnitude maps to -8 (llama.cpp's
    Q4_0 choice), which uses all 16 codes; a value of the opposite sign and equal size clamps to 7."""
    n, k = w.shape[-2], w.shape[-1]
    pad = num_groups(k, group_size) * group_size - k
    g = torch.nn.functional.pad(w, (0, pad)).unflatten(-1, (-1, group_size))
    if bits == 8:
        s = g.abs().amax(-1) / 127
    else:
        idx = g.abs().argmax(-1, keepdim=True)
        s = g.gather(-1, idx).squeeze(-1) / -8
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s.reshape(*w.shape[:-2], n, -1)


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[.., N, G] per-group values -> [.., N, K] per-column values."""
    return t.repeat_interleave(group_size, dim=-1)[..., :k]


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return (w / expand_groups(scales, w.shape[-1], group_size)).round_().clamp_(lo, hi).to(torch.int8)


class QTensor:
    """A quantized [.., N, K] matrix (or a stack of them, e.g. one per routed expert). Indexing the leading
    dims or the rows gives a view that shares storage, as with tensors."""

    def __init__(self, q, scales, mins, bits: int, group_size: int, k: int, perm=None):
        self.q, self.scales, self.mins, self.perm = q, scales, mins, perm
        self.bits, self.group_size, self.k = bits, group_size, k

    @classmethod
    def empty(cls, shape, bits: int, group_size: int, device=None, with_mins: bool = False) -> "QTensor":
        *lead, n, k = shape
        if bits not in BITS:
            raise ValueError(f"quantized weights have 4 or 8 bits, not {bits}")
        if bits == 4 and (k % 2 or group_size % 2):
            raise ValueError(f"int4 needs an even input size and group size, got K={k}, group {group_size}")
        group_size = min(group_size, k)
        q = torch.empty(*lead, n, k if bits == 8 else k // 2, dtype=torch.int8 if bits == 8 else torch.uint8, device=device)
        ng = num_groups(k, group_size)
        scales = torch.empty(*lead, n, ng, dtype=torch.float32, device=device)
        mins = torch.zeros(*lead, n, ng, dtype=torch.float32, device=device) if with_mins else None
        return cls(q, scales, mins, bits, group_size, k)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.q.shape[:-1], self.k)

    @property
    def data(self) -> "QTensor":
        return self

    @property
    def device(self) -> torch.device:
        return self.q.device

    def __getitem__(self, idx) -> "QTensor":
        idx = idx if isinstance(idx, tuple) else (idx,)
        lead = self.q.dim() - 2
        perm = None if self.perm is None else self.perm[idx[:lead]] if lead else self.perm
        pick = lambda t: None if t is None else t[idx]
        return QTensor(self.q[idx], self.scales[idx], pick(self.mins), self.bits, self.group_size, self.k, perm)

    def store(self, w: torch.Tensor):
        """Quantizes a full-precision matrix (or stack) into this (view of a) QTensor: round to nearest,
        symmetric, STORE_VALUES at a time so that the fp32 temporaries stay small next to the matrix."""
        if w.dim() > 2:
            for i in range(w.shape[0]):
                self[i].store(w[i])
            return
        rows = max(1, STORE_VALUES // w.shape[-1])
        for r0 in range(0, w.shape[0], rows):
            chunk = w[r0:r0 + rows].to(self.device, torch.float32)
            scales = symmetric_scales(chunk, self.bits, self.group_size)
            self[r0:r0 + rows].store_codes(quantize_codes(chunk, scales, self.bits, self.group_size), scales)

    def store_codes(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                    perm: torch.Tensor | None = None):
        self.q.copy_(codes if self.bits == 8 else pack_int4(codes, self.group_size))
        self.scales.copy_(scales)
        if mins is not None:
            if self.mins is None:
                raise ValueError("this quantized weight was allocated without offsets (mins)")
            self.mins.copy_(mins)
        if perm is not None:
            if self.perm is None:
                raise ValueError("this quantized weight was allocated without a column permutation")
            self.perm.copy_(perm)

    def codes(self) -> torch.Tensor:
        return self.q if self.bits == 8 else unpack_int4(self.q, self.group_size)

    def dequantize(self) -> torch.Tensor:
        """fp32 [.., N, K] in the (permuted) column order the codes are stored in."""
        w = self.codes().float() * expand_groups(self.scales, self.k, self.group_size)
        if self.mins is not None:
            w += expand_groups(self.mins, self.k, self.group_size)
        return w

    def to_dense(self) -> torch.Tensor:
        """The matrix in the original column order: x @ to_dense().T == x[:, perm] @ dequantize().T."""
        w = self.dequantize()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        return out.scatter_(-1, self.perm.long().unsqueeze(-2).expand_as(w), w)
