"""`token_mask`: structured outputs' allowed-token bitmasks applied to fp32 logits in place, in C (the torch
reference is dsinfer.engine.sampler.mask_rows)."""
import torch

from dsinfer.kernels.lib import library


def token_mask_usable(logits: torch.Tensor) -> bool:
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and library() is not None


def token_mask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32 on the CPU, rows unit-stride; bitmask int32 [len(rows), >= ceil(V / 32)], bit t % 32 of
    word t // 32 set where token t is allowed: row rows[j] keeps only what bitmask[j] allows (the rest -inf)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"token_mask takes fp32 [B, V] logits with unit-stride rows, not {logits.dtype} "
                         f"{tuple(logits.shape)} (strides {logits.stride()})")
    vocab = logits.shape[1]
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.shape[0] != len(rows) \
            or bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"token_mask's bitmask must be int32 [{len(rows)}, >= {(vocab + 31) // 32}], not "
                         f"{bitmask.dtype} {tuple(bitmask.shape)}")
    if rows and not 0 <= min(rows) <= max(rows) < logits.shape[0]:
        raise ValueError(f"token_mask's rows {rows} are outside the logits' {logits.shape[0]} rows")
    bitmask = bitmask.contiguous()
    index = torch.tensor(rows, dtype=torch.int64)
    library().token_mask_f32(logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), index.data_ptr(), len(rows),
                             vocab, bitmask.shape[1])
    return logits
