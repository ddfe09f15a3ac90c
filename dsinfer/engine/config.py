from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    """How the engine batches and caches. Names follow vLLM's engine arguments."""
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048      # tokens per step, prefill chunks and decodes together
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache_memory: int | None = None      # bytes for the latent cache; None: a fraction of free memory
    kv_cache_memory_fraction: float = 0.2
    length_bucketing: bool = True           # admit waiting requests of similar length together
    bucket_window: int = 64                 # how far past the head of the queue bucketing looks

    def check(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must "
                             f"be at least max_model_len ({self.max_model_len}) so that every prompt fits one step")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
