"""DeepSeek's FP8 checkpoints: float8_e4m3fn weights with one fp32 scale per 128x128 tile."""
import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def check_fp8_config(qc: dict) -> tuple[int, int]:
    """Returns the weight block size of a supported quantization_config, or raises naming the problem."""
    method = qc.get("quant_method")
    if method != "fp8":
        raise ValueError(f"unsupported quantization_config.quant_method {method!r}; dsinfer loads 'fp8' checkpoints")
    block = qc.get("weight_block_size") or [128, 128]
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"quantization_config.weight_block_size must be two positive ints, got {block}")
    return int(block[0]), int(block[1])


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """W = fp8 * scale_inv[i // bo, j // bi] (multiplied, despite the name); edge tiles are partial."""
    rows, cols = weight.shape
    bo, bi = block
    expected = (-(-rows // bo), -(-cols // bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"{name}_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                         f"for a {rows}x{cols} weight in {bo}x{bi} blocks")
    scale = scale_inv.float().repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
    return weight.float() * scale
