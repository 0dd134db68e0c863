"""Conditional disaggregation in the router: per request, the decode instance prefills locally or the
prefill pool does, decided at the threshold, prefill-queue and decode-slack edges from what the router
tracks; the decision and its inputs in the breakdown; the same tokens either way."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from pdserve.config import RouterConfig
from pdserve.router.conditional import decode_slack_tokens
from pdserve.router.core import Router
from pdserve.types import GenerateRequest, LatencyBreakdown, RequestId, SamplingParams, StepOutput, WorkerStats
from tests.router.conftest import FakeHandle, expected_tokens, make_router
from tests.router.test_core import assert_idle, collect, run, tokens

PROMPT = tuple(range(3, 23))  # 20 tokens


def req(rid: str, prompt: tuple[int, ...] = PROMPT, max_tokens: int = 5) -> GenerateRequest:
    return GenerateRequest(RequestId(rid), prompt, SamplingParams(temperature=0, max_tokens=max_tokens))


def conditional(threshold: int = 20, queue_limit: int | None = None, **kw: object) -> tuple[Router, list, list]:
    router, prefills, decodes = make_router(cfg=RouterConfig(pd_threshold_tokens=threshold,
                                                             pd_prefill_queue_limit=queue_limit), **kw)
    run(router.refresh_stats())  # the decode instances' limits: no slack is assumed before they are known
    return router, prefills, decodes


def served(router: Router, r: GenerateRequest) -> list[StepOutput]:
    outs = run(collect(router, r))
    assert tokens(outs) == expected_tokens(r.prompt_token_ids, r.sampling.max_tokens or 0)
    assert outs[-1].finish_reason == "length"
    return outs


@pytest.mark.parametrize("threshold, local, reason", [(20, True, "short"), (19, False, "long")])
def test_the_threshold_edge(threshold: int, local: bool, reason: str) -> None:
    router, (p,), (d,) = conditional(threshold)
    t = served(router, req("r"))[-1].latency
    assert t is not None and (t.pd_local, t.pd_reason) == (local, reason)
    assert (t.pd_uncached_tokens, t.pd_prefill_queue_tokens, t.pd_decode_slack_tokens) == (20, 0, 256)
    ((dreq, handle),) = d.calls
    if local:  # straight to decode, no KV handle, marked as intended (not a recompute)
        assert not p.calls and handle is None and dreq.local_prefill and dreq.output_token_ids == ()
        assert t.prefill_s == 0.02 and t.transfer_bytes is None  # decode's prefill (the fake's figures)
    else:  # today's path: prefill, then decode pulls
        assert len(p.calls) == 1 and handle == FakeHandle("r", 20) and not dreq.local_prefill
        assert t.prefill_s == 0.01 and t.transfer_bytes == 4096
    assert router.conditional is not None and dict(router.conditional.decisions) == {("local" if local else
                                                                                       "remote", reason): 1}
    assert_idle(router)


@pytest.mark.parametrize("queued, local, reason", [(101, True, "prefill_saturated"), (100, False, "long")])
def test_the_prefill_queue_edge(queued: int, local: bool, reason: str) -> None:
    router, _, (d,) = conditional(threshold=4, queue_limit=100, num_prefill=2)
    for inst in router.prefill.instances.values():  # the least-loaded prefill instance has `queued` tokens
        inst.outstanding_tokens = queued
    router.prefill.instances["p1"].outstanding_tokens += 50
    t = served(router, req("r"))[-1].latency
    assert t is not None and (t.pd_local, t.pd_reason, t.pd_prefill_queue_tokens) == (local, reason, queued)
    for inst in router.prefill.instances.values():
        inst.outstanding_tokens = 0
    assert_idle(router)


def test_no_decode_slack_sends_a_short_prompt_to_the_prefill_pool() -> None:
    router, (p,), (d,) = conditional()
    d.used_blocks = d.num_blocks - 1  # 20 uncached tokens + 1 need two blocks of 16
    run(router.refresh_stats())
    t = served(router, req("r"))[-1].latency
    assert t is not None and (t.pd_local, t.pd_reason, t.pd_decode_slack_tokens) == (False, "no_decode_slack", 0)
    assert len(p.calls) == 1


def test_slack_is_the_budget_less_the_decodes_and_queued_local_prefills() -> None:
    s = WorkerStats("d", num_running=3, num_waiting=1, num_free_blocks=10, num_total_blocks=10, outstanding_tokens=40,
                    max_num_seqs=8, max_num_batched_tokens=256, block_size=16)
    assert decode_slack_tokens(s, 111) == 256 - 4 - 40  # 7 blocks for the prompt (+1) + 3 in reserve: they fit
    assert decode_slack_tokens(s, 112) == 0  # 8 + 3 blocks: they do not
    assert decode_slack_tokens(dataclasses.replace(s, num_waiting=5), 10) == 0  # no free sequence slot
    assert decode_slack_tokens(dataclasses.replace(s, outstanding_tokens=400), 10) == 0
    assert decode_slack_tokens(WorkerStats("d"), 10) == 0  # limits not polled yet: nothing assumed


def test_a_local_prefill_in_flight_counts_against_the_next_decision() -> None:
    router, _, (d,) = conditional(threshold=20)
    d.delay_s = 0.05  # per token: the first request is still prefilling when the second is decided

    async def two() -> list[list[StepOutput]]:
        first = asyncio.ensure_future(collect(router, req("a", max_tokens=3)))
        await asyncio.sleep(0.005)  # (timers fire in deadline order: before the fake's first token)
        assert router.decode.instances["d0"].outstanding_tokens == 20  # its uncached tokens, until its first output
        second = await collect(router, req("b", max_tokens=3))
        return [await first, second]

    first, second = run(two())
    assert first[-1].latency is not None and first[-1].latency.pd_decode_slack_tokens == 256
    assert second[-1].latency is not None and second[-1].latency.pd_decode_slack_tokens == 256 - 1 - 20
    assert_idle(router)


def test_the_next_turn_of_a_cached_conversation_is_prefilled_locally() -> None:
    """With prefix caching, the uncached part is what the decode instance lacks: turn 1 (20 tokens,
    threshold 8) goes to the prefill pool; turn 2 (turn 1 + its 5-token answer + 6 new tokens) to the
    instance holding turn 1's prompt and answer (their full blocks: 24 tokens), which prefills the
    rest itself."""
    router, (p,), (d0, d1) = make_router(cfg=RouterConfig(decode_policy="cache_aware", pd_threshold_tokens=8),
                                         num_decode=2, prefix_block_size=4)
    run(router.refresh_stats())
    t1 = served(router, req("t1"))[-1].latency
    assert t1 is not None and (t1.pd_local, t1.pd_uncached_tokens) == (False, 20)
    home = next(d for d in (d0, d1) if d.calls)
    turn2 = PROMPT + tuple(expected_tokens(PROMPT, 5)) + (7, 8, 9, 10, 11, 12)  # 31 tokens, 20 cached
    t2 = served(router, req("t2", turn2))[-1].latency
    assert t2 is not None and (t2.pd_local, t2.pd_reason, t2.pd_uncached_tokens) == (True, "short", 7)
    assert home.calls[-1][0].request_id == "t2" and len(p.calls) == 1
    assert_idle(router)


def test_a_local_prefill_lost_with_its_instance_is_recomputed_elsewhere() -> None:
    router, _, (d0, d1) = conditional(num_decode=2, failover_wait_s=0.0)
    d0.die_after = d1.die_after = 2  # whichever serves it first dies after 2 tokens
    outs = run(collect(router, req("r", max_tokens=3)))
    assert tokens(outs) == expected_tokens(PROMPT, 3) and router.num_redispatched == 1
    (first, _), (again, handle) = [c for d in (d0, d1) for c in d.calls]
    assert first.local_prefill and not again.local_prefill and handle is None  # the retry is a recompute
    assert again.output_token_ids == tuple(expected_tokens(PROMPT, 2))


def test_off_by_default_no_decision_is_made_or_shown() -> None:
    router, (p,), _ = make_router()
    t = served(router, req("r"))[-1].latency
    assert router.conditional is None and t is not None and t.pd_local is None and len(p.calls) == 1
    assert not any(k.startswith("pd_") for k in t.to_json())


@pytest.mark.parametrize("threshold, local", [(20, True), (19, False)])
def test_layerwise_streaming_takes_the_decision_too(threshold: int, local: bool) -> None:
    router, (p,), (d,) = conditional(threshold)
    router.layerwise = True
    t = served(router, req("r"))[-1].latency
    assert t is not None and t.pd_local is local and len(p.calls) == (0 if local else 1)
    assert [h is None for _, h in d.calls] == [local]
    assert_idle(router)


def test_the_decision_survives_adding_the_parts() -> None:
    decided = LatencyBreakdown(pd_local=False, pd_reason="long", pd_uncached_tokens=90, pd_prefill_queue_tokens=12,
                               pd_decode_slack_tokens=200)
    parts = LatencyBreakdown(prefill_s=0.5) + decided + LatencyBreakdown(transfer_s=0.25, kv_pull="ok")
    assert (parts.pd_local, parts.pd_reason, parts.pd_uncached_tokens, parts.pd_prefill_queue_tokens,
            parts.pd_decode_slack_tokens) == (False, "long", 90, 12, 200)
    assert parts.prefill_s == 0.5 and parts.transfer_s == 0.25
    assert {k: v for k, v in parts.to_json().items() if k.startswith("pd_")} == {
        "pd_local": 0.0, "pd_reason": "long", "pd_uncached_tokens": 90.0, "pd_prefill_queue_tokens": 12.0,
        "pd_decode_slack_tokens": 200.0}


def test_choosing_records_nothing_until_committed_and_a_finished_turn_is_remembered() -> None:
    router, _, (d0, d1) = make_router(cfg=RouterConfig(decode_policy="round_robin"), num_decode=2,
                                      prefix_block_size=4)
    pool, r = router.decode, req("a")
    assert pool.choose(r) == (pool.instances["d0"], 0) and pool.choose(r) == (pool.instances["d0"], 0)
    assert pool.num_dispatched == 0 and pool.prefix is not None and pool.prefix.hit_blocks("d0", _keys(PROMPT)) == 0
    pool.commit(r, pool.instances["d0"])
    assert pool.num_dispatched == 1 and pool.choose(r) == (pool.instances["d1"], 0)  # round robin moved on
    assert pool.prefix.hit_blocks("d0", _keys(PROMPT)) == 5
    pool.remember("d1", PROMPT + (1, 2, 3, 4))
    assert pool.prefix.hit_blocks("d1", _keys(PROMPT + (1, 2, 3, 4))) == 6


def _keys(tokens: tuple[int, ...]) -> list[bytes]:
    from pdserve.prefix_keys import chain_keys

    return chain_keys(tokens, 4)


def test_a_client_gone_during_a_local_prefill_aborts_it_and_leaves_no_count() -> None:
    router, (p,), (d,) = conditional()
    d.delay_s = 0.05

    async def gone() -> None:
        stream = router.submit(req("r", max_tokens=10))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)  # the decode instance is prefilling
        assert router.decode.instances["d0"].outstanding_tokens == 20
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await stream.aclose()

    run(gone())
    assert d.aborted == ["r"] and not p.calls and not p.aborted
    assert_idle(router)


def test_a_prefill_pool_without_healthy_instances_means_a_local_prefill_not_a_recompute() -> None:
    router, (p,), (d,) = conditional(threshold=4)  # 20 uncached tokens: "long" while prefill serves
    router.remove(p.worker_id)
    t = served(router, req("r"))[-1].latency
    assert t is not None and (t.pd_local, t.pd_reason, t.kv_recomputed) == (True, "no_prefill", False)
    ((dreq, handle),) = d.calls
    assert handle is None and dreq.local_prefill and not p.calls
    assert dict(router.conditional.decisions) == {("local", "no_prefill"): 1}
    assert_idle(router)
