from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from pdserve.config import RouterConfig
from pdserve.router.core import OverloadedError, Router, UnavailableError
from pdserve.types import GenerateRequest, RequestId, SamplingParams, StepOutput
from tests.router.conftest import FakeDecode, FakeHandle, expected_tokens, make_router

T = TypeVar("T")
PROMPT = (5, 9, 11)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


def req(rid: str = "r1", max_tokens: int = 6, prompt: tuple[int, ...] = PROMPT) -> GenerateRequest:
    return GenerateRequest(RequestId(rid), prompt, SamplingParams(temperature=0, max_tokens=max_tokens))


async def collect(router: Router, r: GenerateRequest) -> list[StepOutput]:
    return [out async for out in router.submit(r)]


def tokens(outs: list[StepOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def assert_idle(router: Router) -> None:
    assert not router.requests
    for pool in (router.prefill, router.decode):
        for inst in pool.instances.values():
            assert inst.num_inflight == 0 and inst.outstanding_tokens == 0, inst


def test_disaggregated_lifecycle() -> None:
    router, (p,), (d,) = make_router("disaggregated")
    outs = run(collect(router, req()))
    assert tokens(outs) == expected_tokens(PROMPT, 6)
    assert outs[-1].finish_reason == "length" and all(not o.finished for o in outs[:-1])
    # decode continues after the first token, pulling the KV prefill left behind
    (dreq, handle), = d.calls
    assert dreq.output_token_ids == tuple(expected_tokens(PROMPT, 1))
    assert handle == FakeHandle("r1", len(PROMPT))
    t = outs[-1].latency
    assert t is not None and set(t.to_json()) >= {"queue_s", "prefill_s", "transfer_s", "decode_s", "ttft_s", "e2e_s"}
    assert t.queue_s == pytest.approx(0.003) and t.prefill_s == 0.01 and t.transfer_bytes == 4096
    assert t.decode_queue_s == pytest.approx(0.002)  # the decode pool's share of queue_s
    assert t.prefill_queue_s == pytest.approx(0.001) and t.kv_pull == "ok" and not t.kv_recomputed
    assert t.ttft_s <= t.e2e_s
    assert t.decode_s == pytest.approx(max(0.0, t.e2e_s - t.queue_s - t.prefill_s - t.transfer_s))
    assert all(o.latency is None for o in outs[:-1])  # the workers' parts are folded into the breakdown
    assert not p.aborted and not d.aborted
    assert_idle(router)


def test_colocated_goes_straight_to_decode_without_handle() -> None:
    router, _, (d,) = make_router("colocated")
    outs = run(collect(router, req()))
    assert tokens(outs) == expected_tokens(PROMPT, 6)
    (dreq, handle), = d.calls
    assert handle is None and dreq.output_token_ids == ()
    assert outs[-1].latency is not None and outs[-1].latency.prefill_s == 0.02
    assert outs[-1].latency.decode_queue_s is None and "decode_queue_s" not in outs[-1].latency.to_json()
    assert_idle(router)


def test_finished_at_first_token_never_reaches_decode() -> None:
    router, _, (d,) = make_router()
    outs = run(collect(router, req(max_tokens=1)))
    assert tokens(outs) == expected_tokens(PROMPT, 1) and outs[-1].finish_reason == "length"
    assert not d.calls


def test_policy_spreads_concurrent_requests() -> None:
    router, prefills, decodes = make_router(num_prefill=2, num_decode=2)
    for w in prefills + decodes:
        w.delay_s = 0.01

    async def many() -> list[list[StepOutput]]:
        return await asyncio.gather(*(collect(router, req(f"r{i}")) for i in range(8)))

    results = run(many())
    assert all(tokens(o) == expected_tokens(PROMPT, 6) for o in results)
    assert [len(p.calls) for p in prefills] == [4, 4]
    assert [len(d.calls) for d in decodes] == [4, 4]
    assert_idle(router)


def test_decode_death_redispatches_with_streamed_tokens() -> None:
    router, (p,), (d0, d1) = make_router(num_decode=2, cfg=RouterConfig(decode_policy="round_robin"))
    d0.die_after = 2  # prefill's token + 2 from d0, then d0 dies
    outs = run(collect(router, req(max_tokens=8)))
    assert tokens(outs) == expected_tokens(PROMPT, 8)  # nothing lost, nothing repeated
    assert outs[-1].finish_reason == "length"
    (req1, handle1), = d1.calls
    assert handle1 is None  # recompute: the KV on prefill was meant for d0
    assert req1.output_token_ids == tuple(expected_tokens(PROMPT, 3))
    assert "r1" in p.aborted  # prefill told to drop the KV nobody will pull
    assert not router.decode.instances["d0"].healthy and router.num_redispatched == 1
    assert_idle(router)


def test_decode_death_waits_for_the_instance_to_come_back() -> None:
    router, _, (d,) = make_router("colocated", failover_wait_s=5.0)
    router.probe_interval_s = 0.01
    d.die_after = 3

    async def scenario() -> list[StepOutput]:
        async def restart() -> None:  # Ray restarts the actor behind the same handle
            while not d.dead:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            d.die_after = None
            d.revive()

        restarter = asyncio.create_task(restart())
        outs = await collect(router, req(max_tokens=6))
        await restarter
        return outs

    outs = run(scenario())
    assert tokens(outs) == expected_tokens(PROMPT, 6)
    assert len(d.calls) == 2 and router.decode.instances["d0"].healthy


def test_decode_death_without_replacement_is_an_explicit_error() -> None:
    router, _, (d,) = make_router(failover_wait_s=0.0)
    d.die_after = 2
    outs = run(collect(router, req()))
    assert outs[-1].finish_reason == "error" and "no healthy decode" in (outs[-1].error or "")
    assert tokens(outs) == expected_tokens(PROMPT, 3)
    assert_idle(router)


def test_prefill_death_tries_another_then_falls_back_to_decode_recompute() -> None:
    router, (p0, p1), (d,) = make_router(num_prefill=2)
    p0.kill()
    outs = run(collect(router, req("a")))
    assert tokens(outs) == expected_tokens(PROMPT, 6) and len(p1.calls) == 1
    assert not router.prefill.instances["p0"].healthy
    p1.kill()
    outs = run(collect(router, req("b")))
    assert tokens(outs) == expected_tokens(PROMPT, 6)
    assert d.calls[-1][1] is None and d.calls[-1][0].output_token_ids == ()
    assert_idle(router)


def test_per_request_failure_keeps_the_instance() -> None:
    router, (p,), _ = make_router()
    p.fail_requests = True
    outs = run(collect(router, req()))
    assert len(outs) == 1 and outs[0].finish_reason == "error" and "bad request" in (outs[0].error or "")
    assert router.prefill.instances["p0"].healthy
    assert_idle(router)


def test_close_early_aborts_on_every_holder() -> None:
    router, (p,), (d,) = make_router()
    d.delay_s = 0.01

    async def scenario() -> list[StepOutput]:
        stream = router.submit(req(max_tokens=100))
        outs = [await anext(stream), await anext(stream)]
        await stream.aclose()  # the client went away
        return outs

    outs = run(scenario())
    assert len(tokens(outs)) == 2
    assert p.aborted == ["r1"] and d.aborted == ["r1"]
    assert_idle(router)


def test_cancelled_consumer_aborts() -> None:
    router, _, (d,) = make_router("colocated")
    d.delay_s = 0.05

    async def scenario() -> None:
        task = asyncio.create_task(collect(router, req(max_tokens=100)))
        await asyncio.sleep(0.12)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)  # the abort runs shielded from the cancellation

    run(scenario())
    assert d.aborted == ["r1"]
    assert_idle(router)


def test_never_iterated_stream_releases_its_slot() -> None:
    router, _, _ = make_router(cfg=RouterConfig(max_pending_requests=1))

    async def scenario() -> None:
        stream = router.submit(req("a"))
        with pytest.raises(OverloadedError) as e:
            router.submit(req("b"))
        assert e.value.retry_after_s > 0 and not isinstance(e.value, UnavailableError)
        await stream.aclose()
        await stream.aclose()  # twice is fine
        assert len([o async for o in router.submit(req("c"))]) == 6

    run(scenario())
    assert_idle(router)


def test_no_healthy_decode_is_unavailable_and_stats_refresh_heals() -> None:
    router, _, (d,) = make_router()
    d.kill()
    run(router.refresh_stats())
    assert router.decode.num_failures == 1
    with pytest.raises(UnavailableError):
        router.submit(req())
    d.revive()
    run(router.refresh_stats())
    assert router.decode.instances["d0"].healthy
    assert tokens(run(collect(router, req()))) == expected_tokens(PROMPT, 6)


def test_reregistered_instance_replaces_the_dead_one() -> None:
    router, _, (old,) = make_router("colocated")
    old.die_after = 2

    async def scenario() -> list[StepOutput]:
        stream = router.submit(req(max_tokens=6))
        outs = [await anext(stream), await anext(stream)]
        new = FakeDecode("d0")
        router.add_decode("d0", new)  # a replacement actor under the same id
        outs += [o async for o in stream]  # the old client dies; that must not mark the new one dead
        assert router.decode.instances["d0"].healthy and len(new.calls) == 1
        return outs

    assert tokens(run(scenario())) == expected_tokens(PROMPT, 6)
    assert_idle(router)


def test_failed_request_releases_prefill_kv() -> None:
    router, (p,), (d,) = make_router()
    d.fail_requests = True
    outs = run(collect(router, req()))
    assert outs[-1].finish_reason == "error"
    assert p.aborted == ["r1"]  # the KV pinned for the failed decode is not left to its lease
