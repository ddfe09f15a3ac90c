"""The block manager alone: accounting, prefix hits (verified on tokens), reference counts, LRU eviction."""
from dsinfer.engine.block_manager import BlockManager
from dsinfer.engine.sequence import Sequence
from dsinfer.sampling_params import SamplingParams


def seq(tokens, i=0):
    return Sequence(i, str(i), 0, tokens, SamplingParams(), 1, None)


def admit(bm, s):
    hits = bm.cached_prefix(s)
    assert bm.can_allocate(s, len(s), hits)
    bm.allocate(s, hits)
    bm.reserve(s, len(s))
    s.num_cached = len(s)
    bm.commit(s)
    return hits


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
    assert len(bm.cached_prefix(seq(list(range(8)), 1))) == 1  # 2 full blocks cached, only the first reused


def test_a_hash_match_with_other_tokens_is_not_a_hit():
    bm = BlockManager(8, 4)
    a = seq(list(range(10)))
    admit(bm, a)
    bm.blocks[a.block_table[0]].token_ids = (7, 7, 7, 7)  # as if another prefix had collided on this hash
    assert bm.cached_prefix(seq(list(range(10)), 1)) == []


def test_freed_blocks_stay_cached_until_evicted_oldest_first():
    bm = BlockManager(4, 4)
    a, b = seq([1] * 5), seq([2] * 5, 1)
    admit(bm, a), bm.free_seq(a)
    admit(bm, b), bm.free_seq(b)
    assert len(bm.cached_prefix(seq([1] * 5, 2))) == 1 and len(bm.cached_prefix(seq([2] * 5, 3))) == 1
    c = seq([3] * 6, 4)
    admit(bm, c)  # needs 2 blocks: the two unnamed partial blocks go first, no cached prefix is lost
    assert len(bm.cached_prefix(seq([1] * 5, 5))) == 1 and len(bm.cached_prefix(seq([2] * 5, 6))) == 1
    d = seq([4] * 2, 7)
    admit(bm, d)  # the least recently freed named block (a's) is evicted
    assert bm.cached_prefix(seq([1] * 5, 8)) == [] and len(bm.cached_prefix(seq([2] * 5, 9))) == 1


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
    assert bm.cached_prefix(seq(list(range(10)), 1)) == []


def test_blocks_recomputed_after_preemption_are_cached_again():
    """A preempted seq whose blocks were evicted meanwhile recomputes into fresh blocks, which must be named."""
    bm = BlockManager(3, 4)
    a = seq(list(range(9)))  # two full blocks and a partial one
    admit(bm, a)
    bm.free_seq(a)  # preempted
    other = seq([50] * 12, 1)
    admit(bm, other)  # takes every block: a's cached prefix is evicted
    bm.free_seq(other)
    assert bm.cached_prefix(seq(list(range(9)), 2)) == []
    assert admit(bm, a) == []  # recomputed from scratch
    assert bm.cached_prefix(seq(list(range(9)) + [77], 3)) == a.block_table[:2]
