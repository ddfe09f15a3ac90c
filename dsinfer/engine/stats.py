"""What the engine reports about itself: queue sizes, cache use, prefix-cache hits, preemptions, experts."""
from dataclasses import dataclass


@dataclass(slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_free: int          # includes blocks that still hold a cached prefix (evictable)
    kv_blocks_cached: int        # free blocks that still hold a cached prefix
    kv_block_size: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens_computed: int
    generated_tokens: int
    expert_counts: dict[int, list[int]]  # MoE layer index -> tokens routed to each expert so far

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free


def collect_stats(engine) -> EngineStats:
    blocks, sched = engine.blocks, engine.scheduler
    cached = sum(1 for b in blocks.free if blocks.blocks[b].hash is not None)
    experts = {i: layer.mlp.expert_counts.tolist() for i, layer in enumerate(engine.model.model.layers)
               if hasattr(layer.mlp, "expert_counts")}
    return EngineStats(len(sched.running), len(sched.waiting), blocks.num_blocks, blocks.num_free, cached,
                       blocks.block_size, engine.cache.bytes_per_token, engine.cache.nbytes, blocks.queried_tokens,
                       blocks.hit_tokens, blocks.hit_rate, sched.num_preemptions, engine.num_prompt_computed,
                       engine.num_generated, experts)
