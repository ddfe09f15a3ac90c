"""The block manager alone: accounting, prefix hits (verified on tokens), reference counts, LRU eviction."""
from dsinfer.engine.block_manager import BlockManager
from dsinfer.engine.sequence import Sequence, block_digest
from dsinfer.sampling_params import SamplingParams


def seq(tokens, i=0):
    return Sequence(i, str(i), 0, tokens, SamplingParams(), 1, None)


def cached(bm, s):
    """The memory blocks of s's cached prefix."""
    return bm.cached_prefix(s).blocks


def admit(bm, s):
    hits = bm.cached_prefix(s)
    assert bm.can_allocate(s, len(s), hits)
    bm.allocate(s, hits)
    bm.reserve(s, len(s))
    s.num_cached = len(s)
    bm.commit(s)
    return hits.blocks


def test_reserve_and_free_account_for_every_block():
    bm = BlockManager(8, 4)
    a = seq(list(range(10)))
    admit(bm, a)
    assert len(a.block_table) == 3 and bm.num_free == 5
    assert not bm.can_reserve(a, 40) and bm.can_reserve(a, 32)
    bm.free_seq(a)
    assert bm.num_free == 8 and a.block_table == [] and a.num_cached == 0


def test_shared_prefix_is_found_and_reference_counted():
    bm = BlockManager(8, 4)
    a, b = seq(list(range(10))), seq(list(range(9)) + [99], 1)
    admit(bm, a)
    hits = admit(bm, b)
    assert hits == a.block_table[:2] and b.block_table[:2] == hits
    assert [bm.blocks[i].ref_count for i in hits] == [2, 2]
    bm.free_seq(a)
    assert [bm.blocks[i].ref_count for i in hits] == [1, 1] and bm.num_free == 8 - 3


def test_the_last_token_is_never_taken_from_the_cache():
    bm = BlockManager(8, 4)
    admit(bm, seq(list(range(8))))
    assert len(cached(bm, seq(list(range(8)), 1))) == 1  # 2 full blocks cached, only the first reused


def test_a_hash_match_with_other_tokens_is_not_a_hit():
    bm = BlockManager(8, 4)
    a = seq(list(range(10)))
    admit(bm, a)
    bm.blocks[a.block_table[0]].token_ids = (7, 7, 7, 7)  # as if another prefix had collided on this hash
    assert cached(bm, seq(list(range(10)), 1)) == []


def test_freed_blocks_stay_cached_until_evicted_oldest_first():
    bm = BlockManager(4, 4)
    a, b = seq([1] * 5), seq([2] * 5, 1)
    admit(bm, a), bm.free_seq(a)
    admit(bm, b), bm.free_seq(b)
    assert len(cached(bm, seq([1] * 5, 2))) == 1 and len(cached(bm, seq([2] * 5, 3))) == 1
    c = seq([3] * 6, 4)
    admit(bm, c)  # needs 2 blocks: the two unnamed partial blocks go first, no cached prefix is lost
    assert len(cached(bm, seq([1] * 5, 5))) == 1 and len(cached(bm, seq([2] * 5, 6))) == 1
    d = seq([4] * 2, 7)
    admit(bm, d)  # the least recently freed named block (a's) is evicted
    assert cached(bm, seq([1] * 5, 8)) == [] and len(cached(bm, seq([2] * 5, 9))) == 1


def test_reviving_a_free_cached_block_counts_against_free_space():
    bm = BlockManager(2, 4)
    a = seq([1] * 5)
    admit(bm, a)
    bm.free_seq(a)
    b = seq([1] * 9, 1)
    hits = bm.cached_prefix(b)
    assert len(hits) == 1 and bm.can_allocate(b, 8, hits) and not bm.can_allocate(b, 9, hits)


def test_prefix_caching_off_finds_nothing():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    admit(bm, seq(list(range(10))))
    assert cached(bm, seq(list(range(10)), 1)) == []


def test_blocks_recomputed_after_preemption_are_cached_again():
    """A preempted seq whose blocks were evicted meanwhile recomputes into fresh blocks, which must be named."""
    bm = BlockManager(3, 4)
    a = seq(list(range(9)))  # two full blocks and a partial one
    admit(bm, a)
    bm.free_seq(a)  # preempted
    other = seq([50] * 12, 1)
    admit(bm, other)  # takes every block: a's cached prefix is evicted
    bm.free_seq(other)
    assert cached(bm, seq(list(range(9)), 2)) == []
    assert admit(bm, a) == []  # recomputed from scratch
    assert cached(bm, seq(list(range(9)) + [77], 3)) == a.block_table[:2]


class Rows:
    """Stands in for KVCache: each block's 'rows' are whatever was last written to it (its id by default)."""

    def __init__(self):
        self.data = {}

    def read_block(self, block_id):
        return [self.data.get(block_id, block_id)]

    def write_block(self, block_id, rows):
        self.data[block_id] = rows[0]


class DictTier:
    """A second tier in a dict; `broken` digests fail to load and are dropped, as a corrupt file would be."""

    def __init__(self):
        self.entries, self.broken, self.fetched = {}, set(), []

    def has(self, digest):
        return digest in self.entries

    def spill(self, digest, token_ids, rows, wait=False):
        self.entries[digest] = (tuple(token_ids), rows)

    def fetch(self, digest, token_ids):
        self.fetched.append(digest)
        tokens, rows = self.entries.pop(digest) if digest in self.broken else self.entries[digest]
        return None if digest in self.broken or tokens != tuple(token_ids) else rows


def tiered(num_blocks=4):
    tier, rows = DictTier(), Rows()
    return BlockManager(num_blocks, 4, tier=tier, cache=rows), tier, rows


def spilled(bm, tokens: list[int]):
    """Runs a sequence of these tokens, finishes it and pushes it out of memory: its named blocks go to the tier."""
    a = seq(tokens)
    admit(bm, a)
    bm.free_seq(a)
    evict_all(bm)


def evict_all(bm, i=100):
    """Runs a sequence that takes every block, so every cached prefix is evicted."""
    other = seq([i] * (bm.num_blocks * 4), i)
    admit(bm, other)
    bm.free_seq(other)


def test_evicted_named_blocks_are_spilled_with_their_tokens_and_rows():
    bm, tier, rows = tiered()
    a = seq(list(range(10)))  # two full blocks and a partial one
    admit(bm, a)
    full = a.block_table[:2]
    rows.data.update({full[0]: "rows of block 0", full[1]: "rows of block 1"})
    bm.free_seq(a)
    evict_all(bm)
    assert sorted(tier.entries.values()) == [((0, 1, 2, 3), ["rows of block 0"]), ((4, 5, 6, 7), ["rows of block 1"])]


def test_a_prefix_continues_from_the_tier_and_is_cached_in_memory_again():
    bm, tier, rows = tiered(6)
    a = seq(list(range(13)))  # three full blocks and one token
    admit(bm, a)
    rows.data.update({b: f"rows {i}" for i, b in enumerate(a.block_table)})
    bm.free_seq(a)
    evict_all(bm)
    b = seq(list(range(13)), 1)
    hits = bm.cached_prefix(b)
    assert hits.blocks == [] and len(hits.on_tier) == 3 and bm.can_allocate(b, 13, hits)
    misses = bm.memory_miss_blocks
    bm.allocate(b, hits)
    assert b.num_cached == 12 and [rows.data[i] for i in b.block_table] == ["rows 0", "rows 1", "rows 2"]
    assert bm.tier_hit_blocks == 3 and bm.memory_miss_blocks - misses == 3
    assert cached(bm, seq(list(range(13)), 2)) == b.block_table  # named: a memory hit now
    bm.reserve(b, 13)
    bm.free_seq(b)
    assert bm.num_free == 6


def test_loading_stops_at_the_first_block_that_fails():
    bm, tier, _ = tiered(6)
    spilled(bm, list(range(13)))
    b = seq(list(range(13)), 1)
    hits = bm.cached_prefix(b)
    tier.broken.add(hits.on_tier[1])
    misses = bm.tier_miss_blocks
    bm.allocate(b, hits)
    assert b.num_cached == 4 and len(b.block_table) == 1 and len(tier.fetched) == 2
    assert bm.tier_hit_blocks == 1 and bm.tier_miss_blocks - misses == 2
    bm.reserve(b, 13)
    bm.free_seq(b)
    assert bm.num_free == 6


def test_tier_hits_need_free_blocks_and_never_hold_the_last_token():
    bm, tier, _ = tiered(4)
    spilled(bm, list(range(8)))  # two full blocks: only the first may come from a cache
    b = seq(list(range(8)), 1)
    hits = bm.cached_prefix(b)
    assert len(hits.on_tier) == 1 and bm.can_allocate(b, 16, hits) and not bm.can_allocate(b, 17, hits)


def test_prompt_logprobs_requests_skip_the_tier():
    bm, tier, _ = tiered(4)
    spilled(bm, list(range(9)))
    b = Sequence(9, "9", 0, list(range(9)), SamplingParams(prompt_logprobs=0), 1, None)
    assert len(bm.cached_prefix(b)) == 0


def test_block_names_are_chained_digests():
    a, b = seq(list(range(8))), seq([9, 9, 9, 9] + list(range(4, 8)), 1)
    da, db = a.block_digests(4, 2), b.block_digests(4, 2)
    assert da[0] == block_digest(b"", [0, 1, 2, 3]) and da[1] == block_digest(da[0], [4, 5, 6, 7])
    assert da[0] != db[0] and da[1] != db[1] and all(len(d) == 16 for d in da + db)
