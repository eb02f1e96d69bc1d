"""KV cache block accounting: free list (LRU), reference counts, chained hashes for prefix caching.

Pure Python, no torch. Block 0 is the null block: never handed out, so padded gathers can point at it.
A freed block keeps its hash and stays findable until it is reused (lazy eviction): the free list is ordered
least-recently-used first, and allocation takes from the front.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmserve.engine.mm_items import block_key, whole_image_prefix
from lmserve.engine.sequence import Sequence

NULL_BLOCK = 0


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple | None = None   # the block's key when hashed (mm_items.block_key): guards against collisions


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    # NOTE: chained, so a block's hash identifies the whole prefix up to and including it.
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("need at least 2 KV blocks (block 0 is reserved)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.free_all()
        # prefix cache counters, in tokens
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def free_all(self) -> None:
        """Every block free and uncached (a new KV cache, or an engine reset); the counters go on."""
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, self.num_blocks))
        self.hash_to_block: dict[int, int] = {}

    # ---- queries ----------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding a cached prefix of seq's tokens. At least one token is always left to compute,
        so the model produces logits for the last position."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        self._compute_hashes(seq, max_blocks)
        hits: list[int] = []
        for i in range(max_blocks):
            block_id = self.hash_to_block.get(seq.block_hashes[i])
            if block_id is None or self.blocks[block_id].token_ids != block_key(seq, i, bs):
                break
            hits.append(block_id)
        if seq.mm_items:    # a bidirectional image is computed whole: never resume inside one
            hits = hits[:whole_image_prefix(seq, len(hits) * bs) // bs]
        return hits

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    # ---- allocation ---------------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_tokens: int, cached_blocks: list[int] = ()) -> bool:
        num_new = self.num_blocks_needed(num_tokens) - len(seq.block_table) - len(cached_blocks)
        # cached blocks sitting in the free list are taken out of it when touched
        num_reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return num_new + num_reclaimed <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make seq's block table cover `num_tokens` tokens, first reusing `cached_blocks` (a prefix hit)."""
        if not self.can_allocate(seq, num_tokens, cached_blocks):
            return False
        for block_id in cached_blocks:
            self._touch(block_id)
            seq.block_table.append(block_id)
        while len(seq.block_table) < self.num_blocks_needed(num_tokens):
            seq.block_table.append(self._pop_free())
        return True

    def share(self, block_ids: list[int]) -> None:
        """Take an extra reference on blocks (e.g. to keep a session's KV pinned after its sequence ends)."""
        for block_id in block_ids:
            self._touch(block_id)

    def release(self, block_ids: list[int]) -> None:
        # NOTE: reversed, so a sequence's tail blocks are evicted before the prefix blocks others may share.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"double free of block {block_id}"
            if block.ref_count == 0:
                self.free_blocks[block_id] = None

    def free(self, seq: Sequence) -> None:
        self.release(seq.block_table)
        seq.block_table = []

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of seq's blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        self._compute_hashes(seq, num_full)
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None:
                continue
            h = seq.block_hashes[i]
            block.block_hash = h
            block.token_ids = block_key(seq, i, bs)
            # NOTE: if another block already holds this prefix, keep the first; this one is just not findable.
            self.hash_to_block.setdefault(h, block.block_id)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = None
        self.hash_to_block.clear()

    # ---- internals ------------------------------------------------------------------------------------------
    def _compute_hashes(self, seq: Sequence, num_blocks: int) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else seq.cache_salt
            hashes.append(hash_block(parent, block_key(seq, i, bs)))

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:   # evict from the prefix cache
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = None
            block.token_ids = None
        block.ref_count = 1
        return block_id
