"""Hands out the latent cache's fixed-size blocks, and shares full blocks between sequences by prefix.

A full block is named by a chained digest (sequence.block_digest: the previous block's name and its tokens), so
one name stands for the whole prefix up to it. A block whose last user finished keeps its name and contents,
sitting in the free list in least-recently-freed order, until a new allocation evicts it. With a second tier
(disk_cache.DiskTier, or anything with has / spill / fetch), an evicted named block is copied out to it, and a
prefix that runs out in memory continues from it on admission."""
from collections import OrderedDict
from dataclasses import dataclass, field

from dsinfer.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id, self.ref_count, self.hash, self.token_ids = block_id, 0, None, ()


@dataclass(slots=True)
class Prefix:
    """A waiting sequence's cached leading blocks: those in memory, then the digests of those the tier holds."""
    blocks: list[int] = field(default_factory=list)
    on_tier: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks) + len(self.on_tier)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, tier=None,
                 cache=None):
        """tier: an optional second tier for evicted blocks; cache: what reads and writes a block's rows
        (KVCache.read_block / write_block), needed with a tier."""
        if tier is not None and cache is None:
            raise ValueError("a prefix-cache tier needs the cache whose block rows it stores")
        self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
        self.tier, self.cache = tier, cache
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.hash_to_block: dict[bytes, int] = {}
        self.queried_tokens = self.hit_tokens = 0
        self.memory_hit_blocks = self.memory_miss_blocks = self.tier_hit_blocks = self.tier_miss_blocks = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_blocks(self, seq: Sequence) -> int:
        """How many of seq's full blocks the cache may serve: not the one holding the last token, which must be
        computed to give logits; none for a request that wants prompt logprobs (they come from the computation)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0
        return (len(seq) - 1) // self.block_size

    def cached_prefix(self, seq: Sequence) -> Prefix:
        """seq's leading full blocks found in memory (tokens verified, not just names), then those the tier holds
        after them (verified when loaded). Looks only at indexes: nothing is read here."""
        count, bs, prefix = self.lookup_blocks(seq), self.block_size, Prefix()
        digests = seq.block_digests(bs, count)
        for i in range(count):
            block_id = self.hash_to_block.get(digests[i])
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            prefix.blocks.append(block_id)
        if self.tier is not None:
            for digest in digests[len(prefix.blocks):count]:
                if not self.tier.has(digest):
                    break
                prefix.on_tier.append(digest)
        return prefix

    def can_allocate(self, seq: Sequence, num_tokens: int, hits: Prefix) -> bool:
        """Whether a waiting seq can get blocks for its first num_tokens, reusing the blocks of `hits` in memory
        (blocks loaded from the tier are fresh ones, counted like any other)."""
        revived = sum(1 for b in hits.blocks if self.blocks[b].ref_count == 0)
        return self.blocks_for(num_tokens) - len(hits.blocks) <= self.num_free - revived

    def allocate(self, seq: Sequence, hits: Prefix):
        """Takes the memory hits for a seq that has no blocks yet, then loads the tier's blocks into fresh ones up
        to the first that fails to load; seq's cached token count follows (it may be below len(hits) blocks)."""
        assert not seq.block_table
        for block_id in hits.blocks:
            self._take(block_id)
        seq.block_table = list(hits.blocks)
        self.load_from_tier(seq, hits.on_tier)
        seq.num_cached = len(seq.block_table) * self.block_size
        seq.num_named = len(seq.block_table)
        self.count_lookup(seq, len(hits.blocks))

    def load_from_tier(self, seq: Sequence, digests: list[bytes]):
        bs = self.block_size
        for digest in digests:
            i = len(seq.block_table)
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            rows = self.tier.fetch(digest, tokens)
            if rows is None:
                return
            block_id = self._fresh()
            self.cache.write_block(block_id, rows)
            self._name(self.blocks[block_id], digest, tokens)
            seq.block_table.append(block_id)

    def count_lookup(self, seq: Sequence, memory_hits: int):
        looked_up, tier_hits = self.lookup_blocks(seq), len(seq.block_table) - memory_hits
        self.queried_tokens += len(seq)
        self.hit_tokens += seq.num_cached
        self.memory_hit_blocks += memory_hits
        self.memory_miss_blocks += looked_up - memory_hits
        if self.tier is not None:
            self.tier_hit_blocks += tier_hits
            self.tier_miss_blocks += looked_up - memory_hits - tier_hits

    def can_reserve(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def reserve(self, seq: Sequence, num_tokens: int):
        """Appends fresh blocks until seq's table covers num_tokens, evicting the least recently freed."""
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._fresh())

    def commit(self, seq: Sequence):
        """Names every block of seq that is full and computed, so later sequences can find it."""
        if not self.enable_prefix_caching:
            return
        bs, full = self.block_size, seq.num_cached // self.block_size
        digests = seq.block_digests(bs, full)
        for i in range(seq.num_named, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                self._name(block, digests[i], tuple(seq.token_ids[i * bs:(i + 1) * bs]))
        seq.num_named = max(seq.num_named, full)

    def free_seq(self, seq: Sequence):
        """Drops seq's references; a block nobody uses goes to the free list, the unnamed ones first in line.
        seq's named count goes too: a preempted seq may be recomputed into other blocks, which commit must name."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table, seq.num_named, seq.num_cached = [], 0, 0

    def _name(self, block: Block, digest: bytes, tokens: tuple):
        block.hash, block.token_ids = digest, tokens
        self.hash_to_block.setdefault(digest, block.block_id)

    def _fresh(self) -> int:
        """Takes the least recently freed block, evicting the prefix it holds (copied out to the tier first)."""
        block_id = next(iter(self.free))
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
            self.spill(block)
        block.hash, block.token_ids = None, ()
        self._take(block_id)
        return block_id

    def spill(self, block: Block, wait: bool = False):
        if self.tier is not None and not self.tier.has(block.hash):
            self.tier.spill(block.hash, block.token_ids, self.cache.read_block(block.block_id), wait)

    def spill_cached(self):
        """Copies every named block still in memory out to the tier (at shutdown, so that a restart finds them),
        waiting for room in the tier's queue rather than dropping any."""
        for block_id in list(self.hash_to_block.values()):
            self.spill(self.blocks[block_id], wait=True)

    def _take(self, block_id: int):
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
