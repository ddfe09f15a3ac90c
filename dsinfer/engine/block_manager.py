"""Hands out the latent cache's fixed-size blocks, and shares full blocks between sequences by prefix.

A full block is named by a chained hash, hash(previous block's hash, its tokens), so one hash stands for the
whole prefix up to it. A block whose last user finished keeps its hash and contents, sitting in the free list
in least-recently-freed order, until a new allocation evicts it."""
from collections import OrderedDict

from dsinfer.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id, self.ref_count, self.hash, self.token_ids = block_id, 0, None, ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.hash_to_block: dict[int, int] = {}
        self.queried_tokens = self.hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks that hold seq's leading full blocks (tokens verified, not just hashes).
        The last token is never taken from the cache: it must be computed to give logits."""
        hits, h, bs = [], None, self.block_size
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return hits
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = hash((h, tokens))
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence, num_tokens: int, hits: list[int]) -> bool:
        """Whether a waiting seq can get blocks for its first num_tokens (reusing `hits`)."""
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_for(num_tokens) - len(hits) <= self.num_free - revived

    def allocate(self, seq: Sequence, hits: list[int]):
        """Takes the prefix-cache hits for a seq that has no blocks yet; its cached token count follows."""
        assert not seq.block_table
        for block_id in hits:
            self._take(block_id)
        seq.block_table = list(hits)
        seq.num_cached = len(hits) * self.block_size
        self.queried_tokens += len(seq)
        self.hit_tokens += seq.num_cached

    def can_reserve(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def reserve(self, seq: Sequence, num_tokens: int):
        """Appends fresh blocks until seq's table covers num_tokens, evicting the least recently freed."""
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            block_id = next(iter(self.free))
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
            self._take(block_id)
            seq.block_table.append(block_id)

    def commit(self, seq: Sequence):
        """Names every block of seq that is full and computed, so later sequences can find it."""
        if not self.enable_prefix_caching:
            return
        bs, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), seq.num_cached // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = hash((hashes[-1] if hashes else None, tokens))
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block.setdefault(h, block.block_id)

    def free_seq(self, seq: Sequence):
        """Drops seq's references; a block nobody uses goes to the free list, the unnamed ones first in line.
        seq's block hashes go too: a preempted seq may be recomputed into other blocks, which commit must name."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table, seq.block_hashes, seq.num_cached = [], [], 0

    def _take(self, block_id: int):
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
