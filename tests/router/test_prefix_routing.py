"""KV-aware routing end to end in the router core: a conversation's next turn goes to the instance
that served (and so caches) its history, within the load bounds; without prefix caching nothing is indexed."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.config import ConfigError, EngineConfig, RouterConfig, ServingConfig
from pdserve.router.core import Router
from pdserve.types import GenerateRequest, RequestId, WorkerStats
from tests.router.conftest import FakeDecode, FakePrefill

TURN1 = tuple(range(3, 67))  # 64 tokens: four blocks of 16


def _router(prefix: bool) -> Router:
    cfg = RouterConfig(prefill_policy="cache_aware", decode_policy="cache_aware")
    router = Router(cfg, "disaggregated", prefix_block_size=16 if prefix else None)
    for i in range(2):
        router.add_prefill(f"p{i}", FakePrefill(f"p{i}"))
        router.add_decode(f"d{i}", FakeDecode(f"d{i}"))
    return router


def test_the_next_turn_follows_the_instance_that_caches_its_history() -> None:
    router = _router(prefix=True)
    turn1, turn2 = GenerateRequest(RequestId("a"), TURN1), GenerateRequest(RequestId("a2"), TURN1 + (9,) * 32)
    unrelated = GenerateRequest(RequestId("b"), tuple(range(200, 264)))
    for pool in (router.prefill, router.decode):
        home = pool.pick(turn1).worker_id
        assert pool.pick(unrelated).worker_id != home  # nothing cached anywhere: the tie rotates
        for _ in range(3):  # the instance that served turn 1 wins every time while loads stay close
            assert pool.pick(turn2).worker_id == home


def test_load_bound_overrides_the_prefix() -> None:
    router = _router(prefix=True)
    home = router.decode.pick(GenerateRequest(RequestId("a"), TURN1)).worker_id
    inst = router.decode.instances[home]
    inst.num_inflight = 9  # far busier than the other instance
    assert router.decode.pick(GenerateRequest(RequestId("a2"), TURN1 + (1,) * 16)).worker_id != home


def test_a_dead_instance_forgets_what_it_cached() -> None:
    router = _router(prefix=True)
    home = router.decode.pick(GenerateRequest(RequestId("a"), TURN1)).worker_id
    assert router.decode.prefix is not None and router.decode.prefix.hit_blocks(home, _keys(TURN1)) == 4
    inst = router.decode.instances[home]
    router.decode.mark_dead(home, inst.client)
    assert router.decode.prefix.hit_blocks(home, _keys(TURN1)) == 0


def test_without_prefix_caching_nothing_is_indexed() -> None:
    router = _router(prefix=False)
    router.decode.pick(GenerateRequest(RequestId("a"), TURN1))
    assert router.decode.prefix is None and router.prefill.prefix is None


def test_cache_aware_needs_prefix_caching_in_the_config() -> None:
    with pytest.raises(ConfigError, match="router.decode_policy: cache_aware needs engine.enable_prefix_caching"):
        ServingConfig(router=RouterConfig(decode_policy="cache_aware"))
    ServingConfig(router=RouterConfig(decode_policy="cache_aware"), engine=EngineConfig(enable_prefix_caching=True))


def _keys(tokens: tuple[int, ...]) -> list[bytes]:
    from pdserve.prefix_keys import chain_keys

    return chain_keys(tokens, 16)


def test_capacity_comes_from_the_polled_stats() -> None:
    router = _router(prefix=True)
    for inst in router.decode.instances.values():
        inst.stats = dataclasses.replace(inst.stats, num_total_blocks=2)  # a cache of two blocks
    home = router.decode.pick(GenerateRequest(RequestId("a"), TURN1)).worker_id
    assert router.decode.prefix is not None and router.decode.prefix.hit_blocks(home, _keys(TURN1)) == 0
    assert isinstance(router.decode.instances[home].stats, WorkerStats)
