from __future__ import annotations

import pytest

from pdserve.router.policies import (
    PREFIX_LOAD_SLACK,
    cache_aware_decode,
    cache_aware_prefill,
    decode_policy,
    least_kv_pressure,
    least_outstanding_tokens,
    prefill_policy,
    round_robin,
)
from pdserve.types import GenerateRequest, RequestId, WorkerStats

REQ = GenerateRequest(RequestId("r"), (1, 2, 3))


def stats(wid: str, *, tokens: int = 0, running: int = 0, waiting: int = 0, free: int = 100,
          hit: int = 0) -> WorkerStats:
    return WorkerStats(wid, num_running=running, num_waiting=waiting, num_free_blocks=free, num_total_blocks=100,
                       outstanding_tokens=tokens, expected_hit_tokens=hit)


def test_prefill_picks_least_outstanding_tokens() -> None:
    snaps = [stats("a", tokens=500), stats("b", tokens=20, waiting=9), stats("c", tokens=300)]
    assert least_outstanding_tokens(REQ, snaps, 0) == "b"


def test_prefill_ties_break_on_waiting_then_rotate_with_tick() -> None:
    snaps = [stats("a", tokens=10, waiting=1), stats("b", tokens=10), stats("c", tokens=10)]
    assert least_outstanding_tokens(REQ, snaps, 0) == "b"
    even = [stats("a"), stats("b"), stats("c")]
    assert [least_outstanding_tokens(REQ, even, t) for t in range(4)] == ["a", "b", "c", "a"]


def test_decode_prefers_low_kv_usage() -> None:
    snaps = [stats("a", free=10), stats("b", free=80, running=30), stats("c", free=40)]
    assert least_kv_pressure(REQ, snaps, 0) == "b"


def test_decode_near_equal_usage_breaks_on_fewest_requests() -> None:
    # 60% and 62% used count as equal: the one with fewer running + waiting requests wins.
    snaps = [stats("a", free=40, running=8), stats("b", free=38, running=2, waiting=1), stats("c", free=10)]
    assert least_kv_pressure(REQ, snaps, 0) == "b"


def test_round_robin_cycles() -> None:
    snaps = [stats("a", tokens=0), stats("b", tokens=10**6)]
    assert [round_robin(REQ, snaps, t) for t in range(5)] == ["a", "b", "a", "b", "a"]


def test_policies_by_config_name() -> None:
    assert prefill_policy("least_tokens") is least_outstanding_tokens
    assert prefill_policy("round_robin") is round_robin
    assert decode_policy("least_kv") is least_kv_pressure
    with pytest.raises(ValueError, match="router.decode_policy"):
        decode_policy("least_tokens")


def test_cache_aware_prefill_counts_only_uncached_work() -> None:
    req = GenerateRequest(RequestId("r"), tuple(range(100)))
    # a: 50 queued + 100 uncached = 150; b: 90 queued + 100 - 96 cached = 94
    assert cache_aware_prefill(req, [stats("a", tokens=50), stats("b", tokens=90, hit=96)], 0) == "b"
    assert cache_aware_prefill(req, [stats("a", tokens=50), stats("b", tokens=90)], 0) == "a"
    assert cache_aware_prefill(req, [stats("a", tokens=0, hit=500), stats("b", tokens=10)], 0) == "a"  # hit capped


def test_cache_aware_decode_follows_the_prefix_within_load_and_memory_bounds() -> None:
    assert cache_aware_decode(REQ, [stats("a", running=3), stats("b", running=4, hit=64)], 0) == "b"
    busy = 3 + PREFIX_LOAD_SLACK + 1
    assert cache_aware_decode(REQ, [stats("a", running=3), stats("b", running=busy, hit=64)], 0) == "a"
    assert cache_aware_decode(REQ, [stats("a", free=90), stats("b", free=50, hit=64)], 0) == "a"  # KV pressure
    assert cache_aware_decode(REQ, [stats("a", running=2), stats("b", running=1)], 0) == "b"  # no hits: least busy



def test_cache_aware_policies_by_config_name() -> None:
    assert prefill_policy("cache_aware") is cache_aware_prefill and decode_policy("cache_aware") is cache_aware_decode
