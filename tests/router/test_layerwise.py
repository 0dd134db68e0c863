"""Router core with layer-wise KV streaming: decode is dispatched with the handle before prefill's
first token, gets the first token after, and every failure after the early dispatch aborts it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from pdserve.router.core import Router
from pdserve.router.errors import RequestFailedError, WorkerDeadError
from pdserve.types import GenerateRequest, PrefillResult
from tests.router.conftest import FakeDecode, FakeHandle, FakePrefill, expected_tokens, make_router
from tests.router.test_core import PROMPT, assert_idle, collect, req, run, tokens


def _router(**kw: object) -> tuple[Router, list[FakePrefill], list[FakeDecode]]:
    router, prefills, decodes = make_router("disaggregated", **kw)  # type: ignore[arg-type]
    router.layerwise = True
    return router, prefills, decodes


class _OrderedPrefill(FakePrefill):
    """Records whether decode had the request (and was still waiting for its first token) while
    the "forward" ran, i.e. before the result."""

    decode: FakeDecode | None = None
    decode_waiting_during_forward: bool = False

    async def _forward(self, r: GenerateRequest) -> PrefillResult:
        await asyncio.sleep(0.05)  # the forward: decode has the request and waits for the first token
        assert self.decode is not None
        self.decode_waiting_during_forward = r.request_id in self.decode.first_tokens
        return await super()._forward(r)


def test_layerwise_dispatches_decode_before_the_first_token_and_matches_the_plain_path() -> None:
    router, (p,), (d,) = _router(prefill_cls=_OrderedPrefill)
    p.decode = d
    outs = run(collect(router, req()))
    plain, _, _ = make_router("disaggregated")
    assert [(o.token_ids, o.text, o.finish_reason) for o in outs] == \
        [(o.token_ids, o.text, o.finish_reason) for o in run(collect(plain, req()))]
    assert tokens(outs) == expected_tokens(PROMPT, 6) and outs[-1].finish_reason == "length"
    assert p.decode_waiting_during_forward
    (dreq, handle), = d.calls
    assert dreq.output_token_ids == () and handle == FakeHandle("r1", len(PROMPT))  # before the first token
    assert not p.aborted and not d.aborted
    assert_idle(router)


def test_layerwise_request_that_ends_at_its_first_token_aborts_decode() -> None:
    router, (p,), (d,) = _router()
    outs = run(collect(router, req(max_tokens=1)))
    assert tokens(outs) == expected_tokens(PROMPT, 1) and outs[-1].finish_reason == "length"
    assert len(d.calls) == 1 and d.aborted == ["r1"] and not d.first_tokens
    assert_idle(router)


class _FailAfterExport(FakePrefill):
    """Exports (the handle goes out), then its forward fails: raises, or an error output, or dies."""

    how: str = "raise"

    async def prefill_stream(self, r: GenerateRequest) -> AsyncIterator[FakeHandle | PrefillResult]:
        self.calls.append(r)
        yield FakeHandle(r.request_id, len(r.prompt_token_ids))
        if self.how == "dead":
            self.kill()
            raise WorkerDeadError(self.worker_id)
        raise RequestFailedError("the forward raised")


def test_layerwise_prefill_failure_after_dispatch_aborts_decode_and_fails_explicitly() -> None:
    router, (p,), (d,) = _router(prefill_cls=_FailAfterExport)
    outs = run(collect(router, req()))
    assert outs[-1].finish_reason == "error" and "the forward raised" in (outs[-1].error or "")
    assert "r1" in d.aborted and not d.running and not d.first_tokens  # decode freed what it held
    assert_idle(router)


def test_layerwise_prefill_death_after_dispatch_aborts_decode_and_retries_elsewhere() -> None:
    router, (p0, p1), (d,) = _router(num_prefill=2, prefill_cls=_FailAfterExport)
    p0.how = p1.how = "dead"
    p1.revive()
    p1.__class__ = FakePrefill  # the second instance works (without streaming: the plain path)
    outs = run(collect(router, req()))
    assert tokens(outs) == expected_tokens(PROMPT, 6) and outs[-1].finish_reason == "length"
    assert "r1" in d.aborted  # the early dispatch, closed before it ran or aborted
    assert d.calls[-1] == (dataclasses.replace(req(), output_token_ids=tuple(expected_tokens(PROMPT, 1))),
                           FakeHandle("r1", len(PROMPT)))  # then the plain handoff, from the second instance
    assert_idle(router)


class _LosesStreamed(FakeDecode):
    """Loses every streamed handoff before its first token (a failed pull with on_failure=fail)."""

    async def first_token(self, request_id: str, token_ids: tuple[int, ...]) -> bool:
        self.first_tokens.pop(request_id).cancel()
        return False


def test_layerwise_decode_that_lost_the_request_recomputes_it() -> None:
    router, (p,), (d,) = _router(decode_cls=_LosesStreamed)
    outs = run(collect(router, req()))
    assert tokens(outs) == expected_tokens(PROMPT, 6) and outs[-1].finish_reason == "length"
    assert [h for _, h in d.calls] == [FakeHandle("r1", len(PROMPT)), None]  # then recomputed, no KV
    assert "r1" in p.aborted and "r1" in d.aborted and router.num_redispatched == 1
    assert_idle(router)
