"""The latent KV cache: per layer, a fixed number of blocks of rows, each row kv_lora_rank + qk_rope_head_dim
values (one token). Its size comes from a memory budget; BlockManager decides who owns which block."""
import os

import torch

from dsinfer.config import ModelConfig


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.num_hidden_layers * cfg.kv_cache_dim * torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device) -> int:
    """Free bytes now: CUDA's own count, or MemAvailable from /proc/meminfo on a CPU host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_blocks(cfg: ModelConfig, dtype, device, block_size: int, memory: int | None, fraction: float,
                max_tokens: int) -> int:
    """Blocks that fit in `memory` bytes, or else in `fraction` of free memory but no more than max_tokens need."""
    per_block = bytes_per_token(cfg, dtype) * block_size
    if memory is not None:
        return memory // per_block
    by_fraction = int(available_memory(torch.device(device)) * fraction) // per_block
    return min(by_fraction, -(-max_tokens // block_size))


class KVCache:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, num_blocks: int, block_size: int = 16):
        self.block_size, self.num_blocks, self.dtype, self.device = block_size, num_blocks, dtype, torch.device(device)
        self.bytes_per_token = bytes_per_token(cfg, dtype)
        self.layers = [torch.zeros(num_blocks * block_size, cfg.kv_cache_dim, dtype=dtype, device=self.device)
                       for _ in range(cfg.num_hidden_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)
