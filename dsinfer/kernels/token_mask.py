"""Structured outputs' allowed-token bitmasks (bit t % 32 of word t // 32 set where token t is allowed) in C:
`token_mask` applies them to fp32 logits in place (the torch reference is dsinfer.engine.sampler.mask_rows),
`token_argmax` picks each row's best allowed token without writing (dsinfer.engine.grammar.best_allowed)."""
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
