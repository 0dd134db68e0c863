"""PrefixCachingAllocator: hash-chained keys, ref-counted sharing, LRU eviction, no leaks under random use."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.prefix_cache import PrefixCachingAllocator
from pdserve.prefix_keys import chain_keys

BS = 4


def test_keys_name_the_whole_prefix_not_the_block_alone() -> None:
    a = chain_keys([1, 2, 3, 4, 5, 6, 7, 8], BS)
    b = chain_keys([9, 2, 3, 4, 5, 6, 7, 8], BS)  # same second block, different first
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]
    assert chain_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], BS) == a  # the partial block gets no key
    assert chain_keys([1, 2, 3, 4], BS, namespace="other-model") != a[:1]


def test_keys_extend_incrementally() -> None:
    tokens = list(range(13))
    keys = chain_keys(tokens[:6], BS)
    assert chain_keys(tokens, BS, keys=keys) is keys
    assert keys == chain_keys(tokens, BS)


def test_freed_blocks_stay_findable_until_evicted_lru() -> None:
    alloc = PrefixCachingAllocator(4)
    first, second = chain_keys(list(range(8)), BS), chain_keys(list(range(100, 108)), BS)
    a, b = alloc.allocate(2), alloc.allocate(2)
    alloc.register(a, first)
    alloc.register(b, second)
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_free == 4 and alloc.num_cached == 4
    assert alloc.lookup(first) == a and alloc.lookup(second) == b
    alloc.acquire(alloc.lookup(second[:1]))  # touch: `second` now holds a ref on its first block
    fresh = alloc.allocate(2)  # no free block left: evicts the least recently freed, `first`
    assert sorted(fresh) == sorted(a) and alloc.lookup(first) == []
    assert alloc.lookup(second) == b and alloc.num_evicted_blocks == 2
    alloc.check_integrity()


def test_lookup_stops_at_the_first_missing_block() -> None:
    alloc = PrefixCachingAllocator(8)
    keys = chain_keys(list(range(12)), BS)
    blocks = alloc.allocate(3)
    alloc.register([blocks[0], blocks[2]], [keys[0], keys[2]])  # block 1's KV never registered
    assert alloc.lookup(keys) == [blocks[0]]
    assert (alloc.num_queried_blocks, alloc.num_hit_blocks) == (3, 1)


def test_a_key_computed_twice_stays_with_its_first_block() -> None:
    alloc = PrefixCachingAllocator(4)
    keys = chain_keys(list(range(4)), BS)
    a, b = alloc.allocate(1), alloc.allocate(1)
    alloc.register(a, keys)
    alloc.register(b, keys)
    assert alloc.key_of(b[0]) is None and alloc.lookup(keys) == a
    alloc.free(b)
    assert alloc.num_cached == 0 and alloc.num_free == 3  # the duplicate frees as a plain block
    alloc.check_integrity()


def test_misuse_is_caught() -> None:
    alloc = PrefixCachingAllocator(2)
    (b,) = alloc.allocate(1)
    alloc.free([b])
    with pytest.raises(AssertionError, match="double free"):
        alloc.free([b])
    with pytest.raises(AssertionError, match="no cached prefix"):
        alloc.acquire([b])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(1, 14)), min_size=1, max_size=60))
def test_random_sharing_never_leaks_or_double_frees(ops: list[tuple[int, int, int]]) -> None:
    """Sequences from a few shared prefixes come and go; every block's state stays consistent, a
    cached hit always holds exactly the KV its key names, and everything is free at the end."""
    alloc = PrefixCachingAllocator(12)
    content: dict[int, bytes] = {}  # block -> key of the KV written into it ("the cache tensor")
    live: list[list[int]] = []
    for kind, prefix, length in ops:
        if kind == 0 and live:  # finish one sequence
            alloc.free(live.pop(prefix % len(live)))
        else:  # start one: reuse its cached prefix, allocate the rest, "compute" it and register
            tokens = [prefix] * 4 + list(range(length))
            keys = chain_keys(tokens, BS)
            hits = alloc.lookup(keys)
            need = -(-len(tokens) // BS) - len(hits)
            if not alloc.can_allocate(need + alloc.num_unreferenced(hits)):
                continue
            alloc.acquire(hits)
            assert all(content[b] == k for b, k in zip(hits, keys)), "a hit returned another prefix's KV"
            fresh = alloc.allocate(need)
            table = hits + fresh
            for b, k in zip(table[len(hits):], keys[len(hits):]):
                content[b] = k
            alloc.register(table[:len(keys)], keys)
            live.append(table)
        alloc.check_integrity()
    for table in live:
        alloc.free(table)
    alloc.check_integrity()
    assert alloc.num_used == 0 and alloc.num_free == 12
