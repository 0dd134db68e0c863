"""Ray's transient `ActorUnavailableError` is not a death: through `RayPrefillClient`/`RayDecodeClient`
over fake actor handles (no Ray cluster) that raise each Ray error type, the request is re-dispatched
and completes exactly, the instance is `unavailable` (out of dispatch, in /health and /metrics, not a
counted failure) and serves again once its stats answer; `ActorDiedError` marks it dead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from pdserve.config import RouterConfig
from pdserve.router.actor import RayDecodeClient, RayPrefillClient, _call
from pdserve.router.core import Router
from pdserve.router.metrics import RouterMetrics
from pdserve.router.errors import WorkerDeadError, WorkerUnavailableError
from pdserve.types import GenerateRequest, RequestId, SamplingParams
from tests.router.conftest import FakeDecode, FakePrefill, expected_tokens

PROMPT = (5, 9, 11)


def _unavailable() -> ActorUnavailableError:
    return ActorUnavailableError("the actor's node is unreachable", b"1" * 16)


class _Method:
    """`handle.method.remote(...)` (and `.options(...)`) of a fake actor handle."""

    def __init__(self, actor: FakeActor, name: str) -> None:
        self.actor, self.name = actor, name

    def options(self, **_: Any) -> _Method:
        return self

    def remote(self, *args: Any) -> Any:
        error = self.actor.errors.get(self.name)
        target: Callable[..., Any] = getattr(self.actor.worker, self.name)
        if self.name == "generate":
            return self.actor.stream(target(*args), error)
        return self.actor.ref(target(*args), error)


class FakeActor:
    """An actor handle over an in-process fake worker; `errors[method]` is raised by that method's
    calls (for `generate`, by the stream after its first item, as Ray raises between items)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.errors: dict[str, Exception] = {}

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)

    async def ref(self, call: Awaitable[Any], error: Exception | None) -> Any:
        if error is not None:
            if asyncio.iscoroutine(call):
                call.close()
            raise error
        return await call

    async def stream(self, outs: AsyncIterator[Any], error: Exception | None) -> AsyncIterator[Awaitable[Any]]:
        n = 0
        async for out in outs:
            if error is not None and n == 1:
                await outs.aclose()
                raise error
            n += 1
            yield self.ref(asyncio.sleep(0, out), None)


def _router(prefills: dict[str, FakeActor], decodes: dict[str, FakeActor]) -> Router:
    router = Router(RouterConfig(), "disaggregated", failover_wait_s=2.0)
    router.probe_interval_s = 0.01
    for wid, a in prefills.items():
        router.add_prefill(wid, RayPrefillClient(wid, a))
    for wid, a in decodes.items():
        router.add_decode(wid, RayDecodeClient(wid, a))
    return router


async def _generate(router: Router, rid: str, max_tokens: int = 6) -> list[int]:
    req = GenerateRequest(RequestId(rid), PROMPT, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    ids: list[int] = []
    async with router.submit(req) as stream:
        async for out in stream:
            assert out.finish_reason != "error", out.error
            ids += out.token_ids
    return ids


@pytest.mark.parametrize(("err", "mapped"), [(ActorDiedError(), WorkerDeadError),
                                              (_unavailable(), WorkerUnavailableError)])
def test_each_ray_error_maps_to_its_own_protocol_error(err: Exception, mapped: type[Exception]) -> None:
    with pytest.raises(WorkerDeadError) as info:
        asyncio.run(_call("w1", FakeActor(None).ref(asyncio.sleep(0), err)))
    assert type(info.value) is mapped and "w1" in str(info.value)


def test_unavailable_prefill_is_not_dead_and_rejoins_when_it_answers() -> None:
    async def run() -> None:
        p0, p1, d0 = FakeActor(FakePrefill("p0")), FakeActor(FakePrefill("p1")), FakeActor(FakeDecode("d0"))
        router = _router({"p0": p0, "p1": p1}, {"d0": d0})
        p0.errors["prefill"] = _unavailable()
        router.prefill.policy = lambda req, snaps, n: "p0" if any(s.worker_id == "p0" for s in snaps) else "p1"
        assert await _generate(router, "r1") == expected_tokens(PROMPT, 6)  # re-dispatched to p1
        assert p1.worker.calls and router.prefill.instances["p0"].state == "unavailable"
        assert (router.prefill.num_failures, router.prefill.num_unavailable) == (0, 1)
        assert router.prefill.counts() == {"healthy": 1, "unavailable": 1, "dead": 0, "total": 2}
        metrics = RouterMetrics(router).render().decode()
        assert 'pdserve_instance_unavailable{instance="p0",role="prefill"} 1.0' in metrics
        assert 'pdserve_worker_failures_total{role="prefill"} 0.0' in metrics
        p0.errors["stats"] = _unavailable()
        await router.refresh_stats()  # still unreachable: stays unavailable, is not promoted to dead
        assert router.prefill.instances["p0"].state == "unavailable"
        del p0.errors["prefill"], p0.errors["stats"]
        await router.refresh_stats()  # it answers again: back in dispatch
        assert router.prefill.instances["p0"].state == "healthy"
        assert await _generate(router, "r2") == expected_tokens(PROMPT, 6) and len(p0.worker.calls) == 1

    asyncio.run(run())


def test_died_prefill_is_dead_and_counted() -> None:
    async def run() -> None:
        p0, p1, d0 = FakeActor(FakePrefill("p0")), FakeActor(FakePrefill("p1")), FakeActor(FakeDecode("d0"))
        router = _router({"p0": p0, "p1": p1}, {"d0": d0})
        p0.errors["prefill"] = p0.errors["stats"] = ActorDiedError()
        router.prefill.policy = lambda req, snaps, n: "p0" if any(s.worker_id == "p0" for s in snaps) else "p1"
        assert await _generate(router, "r1") == expected_tokens(PROMPT, 6)
        assert router.prefill.instances["p0"].state == "dead"
        assert (router.prefill.num_failures, router.prefill.num_unavailable) == (1, 0)
        p0.errors["stats"] = _unavailable()  # a dead instance that Ray cannot reach stays dead
        await router.refresh_stats()
        assert router.prefill.counts() == {"healthy": 1, "unavailable": 0, "dead": 1, "total": 2}

    asyncio.run(run())


def test_decode_unavailable_mid_stream_redispatches_exactly() -> None:
    async def run() -> None:
        p0 = FakeActor(FakePrefill("p0"))
        d0, d1 = FakeActor(FakeDecode("d0")), FakeActor(FakeDecode("d1"))
        router = _router({"p0": p0}, {"d0": d0, "d1": d1})
        d0.errors["generate"] = _unavailable()
        router.decode.policy = lambda req, snaps, n: "d0" if any(s.worker_id == "d0" for s in snaps) else "d1"
        assert await _generate(router, "r1", max_tokens=8) == expected_tokens(PROMPT, 8)
        (resumed, handle), = d1.worker.calls
        assert handle is None and len(resumed.output_token_ids) == 2  # first token + the one d0 streamed
        assert router.decode.instances["d0"].state == "unavailable" and router.decode.num_failures == 0
        assert router.num_redispatched == 1 and not router.requests
        d0.errors.clear()
        await router.refresh_stats()
        assert router.decode.counts()["healthy"] == 2

    asyncio.run(run())


def test_only_unavailable_decode_waits_within_the_failover_timeout() -> None:
    """The only decode instance is unreachable for a moment: the request waits for it (not an error,
    not a death) and completes there once its stats answer."""

    async def run() -> None:
        p0, d0 = FakeActor(FakePrefill("p0")), FakeActor(FakeDecode("d0"))
        router = _router({"p0": p0}, {"d0": d0})
        d0.errors["generate"] = d0.errors["stats"] = _unavailable()

        async def reconnect() -> None:
            while router.decode.instances["d0"].state == "healthy":
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            d0.errors.clear()

        ids, _ = await asyncio.gather(_generate(router, "r1", max_tokens=8), reconnect())
        assert ids == expected_tokens(PROMPT, 8) and len(d0.worker.calls) == 2
        assert router.decode.num_failures == 0 and router.decode.num_unavailable == 1

    asyncio.run(run())
