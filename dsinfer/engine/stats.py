"""What the engine reports about itself: queue sizes, cache use, prefix-cache hits in memory and on disk,
preemptions, experts, speculative decoding's acceptance."""
from dataclasses import dataclass, field


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
    prefix_cache_hit_tokens: int  # from memory and disk together
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens_computed: int
    generated_tokens: int
    expert_counts: dict[int, list[int]]  # MoE layer index -> tokens routed to each expert so far
    # Prefix-cache lookups in full blocks, counted once per admission. A block missed in memory is looked up on
    # disk (when the disk tier is on) from the first memory miss to the first disk miss.
    memory_hit_blocks: int = 0
    memory_miss_blocks: int = 0
    disk_enabled: bool = False
    disk_hit_blocks: int = 0
    disk_miss_blocks: int = 0
    disk_blocks: int = 0             # block files on disk now (this model's subdirectory)
    disk_bytes: int = 0
    disk_stored_blocks: int = 0      # written by this process
    disk_dropped_blocks: int = 0     # evicted while the writer was behind, so not written
    disk_discarded_blocks: int = 0   # files that failed a check (truncated, corrupt, other tokens), deleted
    disk_evicted_blocks: int = 0     # files deleted to keep under prefix_cache_dir_bytes
    disk_store_seconds_mean: float = 0.0
    disk_load_seconds_mean: float = 0.0
    disk_directory: str | None = field(default=None)
    # Speculative decoding (empty without it): per draft position, drafts verified and accepted, and their ratio;
    # tokens emitted per verify step (accepted drafts + the target's own token).
    spec_draft_tokens: list[int] = field(default_factory=list)
    spec_accepted_tokens: list[int] = field(default_factory=list)
    spec_acceptance_rate: list[float] = field(default_factory=list)
    spec_verify_steps: int = 0
    spec_mean_accepted_length: float = 0.0

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free


def collect_stats(engine) -> EngineStats:
    blocks, sched = engine.blocks, engine.scheduler
    cached = sum(1 for b in blocks.free if blocks.blocks[b].hash is not None)
    experts = {i: layer.mlp.expert_counts.tolist() for i, layer in enumerate(engine.model.model.layers)
               if hasattr(layer.mlp, "expert_counts")}
    stats = EngineStats(len(sched.running), len(sched.waiting), blocks.num_blocks, blocks.num_free, cached,
                        blocks.block_size, engine.cache.bytes_per_token, engine.cache.nbytes, blocks.queried_tokens,
                        blocks.hit_tokens, blocks.hit_rate, sched.num_preemptions, engine.num_prompt_computed,
                        engine.num_generated, experts, blocks.memory_hit_blocks, blocks.memory_miss_blocks)
    if engine.disk_tier is not None:
        add_disk_stats(stats, blocks, engine.disk_tier)
    if engine.spec is not None:
        add_spec_stats(stats, engine.spec.stats)
    return stats


def add_spec_stats(stats: EngineStats, spec):
    stats.spec_draft_tokens, stats.spec_accepted_tokens = list(spec.drafted), list(spec.accepted)
    stats.spec_acceptance_rate, stats.spec_verify_steps = spec.acceptance_rate, spec.verify_steps
    stats.spec_mean_accepted_length = spec.mean_accepted_length


def add_disk_stats(stats: EngineStats, blocks, tier):
    t = tier.stats()
    stats.disk_enabled, stats.disk_directory = True, str(tier.directory)
    stats.disk_hit_blocks, stats.disk_miss_blocks = blocks.tier_hit_blocks, blocks.tier_miss_blocks
    stats.disk_blocks, stats.disk_bytes, stats.disk_stored_blocks = t.blocks, t.bytes, t.stored_blocks
    stats.disk_dropped_blocks, stats.disk_discarded_blocks = t.dropped_blocks, t.discarded_blocks
    stats.disk_evicted_blocks = t.evicted_blocks
    stats.disk_store_seconds_mean, stats.disk_load_seconds_mean = t.store_seconds_mean, t.load_seconds_mean
