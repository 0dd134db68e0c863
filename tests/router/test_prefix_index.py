"""PrefixIndex: the router's guess of where prefixes are cached."""

from pdserve.prefix_keys import chain_keys
from pdserve.router.prefix_index import PrefixIndex


def test_hits_count_leading_blocks_per_instance() -> None:
    idx = PrefixIndex()
    turn1 = list(range(40))
    turn2 = turn1 + list(range(100, 120))  # the next turn: history + answer + new message
    idx.record("decode-0", chain_keys(turn1, 8))
    keys2 = chain_keys(turn2, 8)
    assert idx.hit_blocks("decode-0", keys2) == 5 and idx.hit_blocks("decode-1", keys2) == 0
    assert idx.hit_blocks("decode-0", chain_keys([7] + turn1[1:], 8)) == 0  # a different first block
    idx.forget("decode-0")
    assert idx.hit_blocks("decode-0", keys2) == 0


def test_capacity_forgets_the_least_recently_used_prefix() -> None:
    idx = PrefixIndex()
    a, b = chain_keys(list(range(32)), 8), chain_keys(list(range(50, 82)), 8)
    idx.set_capacity("p", 6)
    idx.record("p", a)
    idx.record("p", b)  # 8 keys into 6: a's first two go
    assert idx.hit_blocks("p", b) == 4 and idx.hit_blocks("p", a) == 0
    idx.record("p", a[:2])  # a's head is back; a's middle was evicted, so only 2 lead
    assert idx.hit_blocks("p", a) == 2 and idx.hit_blocks("p", b) == 4
    idx.record("p", a)  # all of a used again: now b's oldest go
    assert idx.hit_blocks("p", a) == 4 and idx.hit_blocks("p", b) == 0
    idx.set_capacity("p", 0)
    assert idx.hit_blocks("p", a) == 0
