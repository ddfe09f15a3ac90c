"""The latent KV cache: per layer, a fixed number of blocks of rows, each row one token's kv_lora_rank +
qk_rope_head_dim values in the cache's format (layers/kv_format.py: fp32, bf16 or fp8). Models with DeepSeek-V3.2's
indexer also keep, per layer, each token's indexer key (index_head_dim values, fp32 beside an fp32 latent, else
bf16) in a second tensor with the same rows, so a block's keys are shared, spilled and freed with its latent.
Its size comes from a memory budget; BlockManager decides who owns which block."""
import os

import torch

from dsinfer.config import ModelConfig
from dsinfer.layers import kv_format
from dsinfer.layers.block_sparse import write_summaries


def index_dtype(kv_dtype: str) -> torch.dtype:
    return torch.float32 if kv_dtype == "float32" else torch.bfloat16


def bytes_per_token(cfg: ModelConfig, kv_dtype: str, extra_layers: int = 0) -> int:
    """Cache bytes per token over all layers: (num_hidden_layers + extra_layers) x row_bytes (kv_format), plus,
    in each layer with its own indexer, the indexer key's index_head_dim x 4 bytes (fp32 cache) or 2 (bf16, fp8).
    extra_layers: the MTP draft layer's latent cache."""
    index = cfg.index_head_dim * index_dtype(kv_dtype).itemsize
    indexed = sum(cfg.runs_indexer(i) for i in range(cfg.num_hidden_layers))
    latent = kv_format.row_bytes(kv_dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    return (cfg.num_hidden_layers + extra_layers) * latent + indexed * index


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


def plan_blocks(cfg: ModelConfig, kv_dtype: str, device, block_size: int, memory: int | None, fraction: float,
                max_tokens: int, extra_layers: int = 0) -> int:
    """Blocks that fit in `memory` bytes, or else in `fraction` of free memory but no more than max_tokens need."""
    per_block = bytes_per_token(cfg, kv_dtype, extra_layers) * block_size
    if memory is not None:
        return memory // per_block
    by_fraction = int(available_memory(torch.device(device)) * fraction) // per_block
    return min(by_fraction, -(-max_tokens // block_size))


class KVCache:
    def __init__(self, cfg: ModelConfig, kv_dtype: str, device, num_blocks: int, block_size: int = 16,
                 extra_layers: int = 0, block_summaries: bool = False):
        """kv_dtype: float32, bfloat16 or fp8 (kv_format.resolve turns auto into one of them). extra_layers: caches
        after the model's own, in the same blocks (the MTP draft layer's), so that they are paged, shared by prefix
        and freed with the sequence like the rest. block_summaries: also keep, per layer, each block's mean latent
        row (fp32), for the training-free sparse attention."""
        self.block_size, self.num_blocks, self.device = block_size, num_blocks, torch.device(device)
        self.kv_dtype, self.bytes_per_token = kv_dtype, bytes_per_token(cfg, kv_dtype, extra_layers)
        r, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.layers = [kv_format.allocate(kv_dtype, num_blocks * block_size, r, dr, self.device)
                       for _ in range(cfg.num_hidden_layers + extra_layers)]
        self.index_layers = [torch.zeros(num_blocks * block_size, cfg.index_head_dim * cfg.runs_indexer(i),
                                         dtype=index_dtype(kv_dtype), device=self.device)
                             for i in range(cfg.num_hidden_layers * cfg.has_indexer)]  # none for shared layers
        self.summaries = [torch.zeros(num_blocks, r + dr, device=self.device)
                          for _ in range(cfg.num_hidden_layers * block_summaries)]
        self.r = r

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor with a row per slot: the latent layers, then the indexer's key layers (if any; GLM's
        shared layers have none)."""
        return self.layers + [t for t in self.index_layers if t.shape[1]]

    def model_caches(self) -> list:
        """What the model's layers take: each layer's latent cache, or (latent, indexer keys) with an indexer."""
        if self.index_layers:
            return list(zip(self.layers, self.index_layers))
        return list(zip(self.layers, self.summaries)) if self.summaries else self.layers

    def read_block(self, block_id: int) -> list[torch.Tensor]:
        """A copy of one block's rows in every layer, as stored ([block_size, row width] each)."""
        rows = slice(block_id * self.block_size, (block_id + 1) * self.block_size)
        return [layer[rows].clone() for layer in self.tensors]

    def write_block(self, block_id: int, rows: list[torch.Tensor]):
        """Puts rows, as read_block gave them, back into one block."""
        span = slice(block_id * self.block_size, (block_id + 1) * self.block_size)
        for layer, part in zip(self.tensors, rows):
            layer[span].copy_(part)
        full = torch.tensor([block_id], device=self.device)
        for layer, summary in zip(self.layers, self.summaries):  # a full block's mean row, as if computed here
            write_summaries(layer, summary, full, torch.full_like(full, self.block_size), self.r)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
