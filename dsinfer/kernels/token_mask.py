"""Structured outputs' allowed-token bitmasks (bit t % 32 of word t // 32 set where token t is allowed) in C:
`token_mask` applies them to fp32 logits in place (the torch reference is dsinfer.engine.sampler.mask_rows),
`token_argmax` picks each row's best allowed token without writing (dsinfer.engine.grammar.best_allowed), and
`RowArgmax` does it for one row through buffers made once."""
import ctypes

import torch

from dsinfer.kernels.lib import library


def token_mask_usable(logits: torch.Tensor) -> bool:
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and library() is not None


def check(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor, name: str):
    """ValueError naming what does not fit: fp32 [B, V] unit-stride rows, int32 [len(rows), >= V / 32] bitmask,
    rows within B."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"{name} takes fp32 [B, V] logits with unit-stride rows, not {logits.dtype} "
                         f"{tuple(logits.shape)} (strides {logits.stride()})")
    vocab = logits.shape[1]
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.shape[0] != len(rows) \
            or bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"{name}'s bitmask must be int32 [{len(rows)}, >= {(vocab + 31) // 32}], not "
                         f"{bitmask.dtype} {tuple(bitmask.shape)}")
    if rows and not 0 <= min(rows) <= max(rows) < logits.shape[0]:
        raise ValueError(f"{name}'s rows {rows} are outside the logits' {logits.shape[0]} rows")


def token_mask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32 on the CPU: row rows[j] keeps only what bitmask[j] allows (the rest -inf)."""
    check(logits, rows, bitmask, "token_mask")
    bitmask = bitmask.contiguous()
    library().token_mask_f32(logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), int64s(rows), len(rows),
                             logits.shape[1], bitmask.shape[1])
    return logits


def token_argmax(scores: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> list[int]:
    """scores [B, V] fp32 on the CPU -> for each rows[j], the token of largest score among those bitmask[j]
    allows (the first of equal ones; 0 where it allows none, as torch's argmax of a row all -inf)."""
    check(scores, rows, bitmask, "token_argmax")
    bitmask, best = bitmask.contiguous(), int64s([0] * len(rows))
    library().token_argmax_f32(scores.data_ptr(), scores.stride(0), bitmask.data_ptr(), int64s(rows), len(rows),
                               scores.shape[1], bitmask.shape[1], best)
    return list(best)


def int64s(values: list[int]) -> ctypes.Array:
    """A C array of int64 (a step's few row numbers: cheaper to build than a tensor)."""
    return (ctypes.c_int64 * len(values))(*values)


class RowArgmax:
    """token_argmax_f32 for one row at a time, with its mask buffer and C arrays made once and no argument check
    per call: the caller writes a row's mask into `mask` (mask_ptr, mask_bytes) and checks the scores once with
    `fits`. A structured-output step's refused rows are few, and on caches cold from the forward pass
    token_argmax's per-call tensor check and ctypes arrays cost more than its C loop (about 17 us against 3)."""
    __slots__ = ("vocab", "words", "mask", "mask_ptr", "mask_bytes", "row0", "best", "fn")

    def __init__(self, vocab: int):
        self.vocab, self.words = vocab, (vocab + 31) // 32
        self.mask = torch.zeros(self.words, dtype=torch.int32)
        self.mask_ptr, self.mask_bytes = self.mask.data_ptr(), 4 * self.words
        self.row0, self.best = int64s([0]), int64s([0])
        self.fn = library().token_argmax_f32

    def fits(self, scores: torch.Tensor) -> bool:
        """Whether scores are fp32 [B, vocab] rows of unit stride on the CPU (what __call__ reads)."""
        return scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.dim() == 2 \
            and scores.shape[1] == self.vocab and scores.stride(1) == 1

    def __call__(self, row_ptr: int) -> int:
        """The token of largest score at row_ptr (vocab fp32 values) among those `mask` allows: the first of
        equal ones, 0 where it allows none (token_argmax's rules)."""
        self.fn(row_ptr, 0, self.mask_ptr, self.row0, 1, self.vocab, self.words, self.best)
        return self.best[0]
