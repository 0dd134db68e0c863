"""BlockAllocator bookkeeping and KVPool gather/scatter."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine.kv_cache import BlockAllocator, KVLayout, KVPool


def test_random_alloc_fork_free_never_leaks_or_double_frees() -> None:
    rng = random.Random(0)
    alloc = BlockAllocator(64)
    owners: list[list[int]] = []  # each entry holds one reference to each of its blocks
    for _ in range(2000):
        op = rng.random()
        if op < 0.4 and alloc.can_allocate(n := rng.randint(1, 6)):
            owners.append(alloc.allocate(n))
        elif op < 0.6 and owners:
            blocks = rng.choice(owners)
            alloc.fork(blocks)
            owners.append(list(blocks))
        elif owners:
            alloc.free(owners.pop(rng.randrange(len(owners))))
        alloc.check_integrity()
        held = {b for o in owners for b in o}
        assert alloc.num_used == len(held)
        for b in held:
            assert alloc.ref_count(b) == sum(o.count(b) for o in owners)
    for o in owners:
        alloc.free(o)
    alloc.check_integrity()
    assert alloc.num_free == 64


def test_double_free_and_over_allocation_are_caught() -> None:
    alloc = BlockAllocator(4)
    ids = alloc.allocate(2)
    alloc.free(ids)
    with pytest.raises(AssertionError, match="double free"):
        alloc.free(ids[:1])
    with pytest.raises(AssertionError):
        alloc.allocate(5)


def test_pool_gather_scatter_round_trip() -> None:
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4)
    a, b = KVPool(layout, 10), KVPool(layout, 10)
    a.kv.normal_()
    blocks = a.gather([7, 2, 5])
    assert blocks.shape == (3, 2, 3, 4, 2, 8)
    b.scatter([0, 1, 9], blocks)
    assert torch.equal(b.kv[:, :, [0, 1, 9]], a.kv[:, :, [7, 2, 5]])
    assert layout.bytes_per_block == 3 * 2 * 4 * 2 * 8 * 4
