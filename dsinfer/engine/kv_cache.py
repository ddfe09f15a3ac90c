"""The latent KV cache: per layer, rows of kv_lora_rank + qk_rope_head_dim values, handed out in blocks."""
import torch

from dsinfer.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, block_size: int = 16, num_blocks: int = 64):
        self.block_size, self.dtype, self.device = block_size, dtype, torch.device(device)
        self.num_layers, self.dim = cfg.num_hidden_layers, cfg.kv_cache_dim
        self.layers = [self._empty(num_blocks) for _ in range(self.num_layers)]
        self.free_blocks = list(range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return self.layers[0].shape[0] // self.block_size

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.dim * self.layers[0].element_size()

    def _empty(self, blocks: int) -> torch.Tensor:
        return torch.zeros(blocks * self.block_size, self.dim, dtype=self.dtype, device=self.device)

    def reserve(self, seq, num_tokens: int):
        """Gives `seq` enough blocks to hold `num_tokens`, growing the cache when no block is free."""
        need = -(-num_tokens // self.block_size) - len(seq.block_table)
        if need > len(self.free_blocks):
            self.grow(max(self.num_blocks, need))
        seq.block_table += [self.free_blocks.pop() for _ in range(max(need, 0))]

    def free(self, seq):
        self.free_blocks += reversed(seq.block_table)
        seq.block_table, seq.num_cached = [], 0

    def grow(self, extra: int):
        old = self.num_blocks
        self.layers = [torch.cat([t, self._empty(extra)]) for t in self.layers]
        self.free_blocks = list(range(old + extra - 1, old - 1, -1)) + self.free_blocks
