"""Prefix caching over the paged KV cache: full blocks found again by a hash chain of their token ids.

`PrefixCachingAllocator` is a `BlockAllocator` (same ids, same ref counts, same interface), so one
object owns every block's state. A block is in exactly one of three states:

    free        ref 0, no key             on the free list; handed out first
    cached      ref 0, keyed              reusable by `lookup`/`acquire`; evicted LRU only when
                                          `allocate` finds the free list empty
    owned       ref >= 1 (keyed or not)   held by requests and/or KV exports

Keys are `pdserve.prefix_keys.chain_keys`: a key names the whole prefix up to and including its
block, so two prompts share block i only if they agree on every token before it. Only full blocks
whose KV is computed get a key (`register`); the partial last block of a sequence is never shared.

The scheme is the one vLLM v1 and SGLang use (hash-chained full blocks, ref counts, LRU eviction of
unreferenced cached blocks); this implementation is pdserve's own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pdserve.engine.kv_cache import BlockAllocator
from pdserve.prefix_keys import BlockKey


class PrefixCachingAllocator(BlockAllocator):
    """A `BlockAllocator` that keeps freed full blocks findable by their prefix key until evicted.

    `num_free` counts free and cached blocks (both can be allocated). Counters for metrics:
    `num_queried_blocks`/`num_hit_blocks` (lookups), `num_evicted_blocks`.
    """

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref-0 keyed blocks, least recent first
        self.num_queried_blocks = 0
        self.num_hit_blocks = 0
        self.num_evicted_blocks = 0

    # ---- the BlockAllocator interface ------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks kept for reuse."""
        return len(self._cached)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks (ref 1, no key): free ones first, then the least recently used cached ones."""
        assert n <= self.num_free, f"asked for {n} blocks, {self.num_free} free"
        take = min(n, len(self._free))
        ids = super().allocate(take)
        for _ in range(n - take):
            b, _ = self._cached.popitem(last=False)
            del self._block_of[self._key_of.pop(b)]
            self._ref[b] = 1
            ids.append(b)
        self.num_evicted_blocks += n - take
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one owner of each block; a keyed block that reaches ref 0 stays cached (most recent)."""
        for b in block_ids:
            assert self._ref[b] > 0, f"double free of block {b}"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._key_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    # ---- prefix reuse ----------------------------------------------------------------------

    def lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        """Blocks holding the longest cached prefix of `keys` (no refs taken; see `acquire`)."""
        hits: list[int] = []
        for key in keys:
            b = self._block_of.get(key)
            if b is None:
                break
            hits.append(b)
        self.num_queried_blocks += len(keys)
        self.num_hit_blocks += len(hits)
        return hits

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Add an owner to blocks `lookup` returned, reviving cached ones."""
        for b in block_ids:
            assert b in self._key_of, f"acquire of block {b}, which holds no cached prefix"
            if self._ref[b] == 0:
                del self._cached[b]
            self._ref[b] += 1

    def num_unreferenced(self, block_ids: Sequence[int]) -> int:
        """How many of these cached blocks `acquire` would take out of `num_free` (those at ref 0)."""
        return sum(1 for b in block_ids if self._ref[b] == 0)

    def register(self, block_ids: Sequence[int], keys: Sequence[BlockKey]) -> None:
        """Key owned, computed full blocks: `block_ids[i]` holds the KV of the block `keys[i]` names.

        A key already held by another block (two requests computed the same prefix at once) is
        left with that block; this one stays unkeyed and frees normally.
        """
        for b, key in zip(block_ids, keys):
            assert self._ref[b] > 0, f"register of free block {b}"
            if b in self._key_of or key in self._block_of:
                continue
            self._key_of[b] = key
            self._block_of[key] = b

    def key_of(self, block_id: int) -> BlockKey | None:
        return self._key_of.get(block_id)

    def check_integrity(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b, r in enumerate(self._ref):
            assert r >= 0, f"block {b} has negative ref count {r}"
            keyed, cached = b in self._key_of, b in self._cached
            assert not (b in free and keyed), f"block {b} is free but keyed"
            assert (r == 0) == (b in free or cached), f"block {b}: ref {r}, free={b in free}, cached={cached}"
            assert not cached or keyed, f"block {b} is cached without a key"
        assert all(self._key_of[b] == k for k, b in self._block_of.items()), "key maps disagree"
        assert len(self._block_of) == len(self._key_of), "key maps disagree in size"
