"""A worker step that raises fails only its batch's requests (error outputs; the instance lives on).
The router retries such a request once, on another instance when there is one; a request that fails
again is a poison request: an explicit error, never replayed across the pool, counted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from pdserve.types import GenerateRequest, PrefillResult, RequestId, SamplingParams, StepOutput
from tests.router.conftest import FakeDecode, FakePrefill, expected_tokens, make_router
from tests.router.test_core import assert_idle, collect, run, tokens

POISON, FINE = (66, 6), (5, 9, 11)


def _failed(worker_id: str, rid: RequestId) -> StepOutput:
    return StepOutput(rid, (), finish_reason="error", error=f"step failed on {worker_id}: RuntimeError: nan")


@dataclass
class StepFailingDecode(FakeDecode):
    """Fails the step of any request with the POISON prompt, and, `flaky` times, any request at all."""

    flaky: int = 0

    async def generate(self, req: GenerateRequest, handle: object) -> AsyncIterator[StepOutput]:
        self.calls.append((req, handle))
        if req.prompt_token_ids == POISON or self.flaky:
            self.flaky = max(0, self.flaky - 1)
            yield _failed(self.worker_id, req.request_id)
            return
        self.calls.pop()
        async for out in super().generate(req, handle):
            yield out


@dataclass
class StepFailingPrefill(FakePrefill):
    async def prefill(self, req: GenerateRequest) -> PrefillResult:
        if req.prompt_token_ids == POISON:
            self.calls.append(req)
            return PrefillResult(_failed(self.worker_id, req.request_id), None)
        return await super().prefill(req)


def _router(mode: str, num_prefill: int = 0, num_decode: int = 3) -> tuple:
    return make_router(mode, num_prefill, num_decode, prefill_cls=StepFailingPrefill, decode_cls=StepFailingDecode)


def _req(rid: str, prompt: tuple[int, ...]) -> GenerateRequest:
    return GenerateRequest(RequestId(rid), prompt, SamplingParams(temperature=0, max_tokens=5))


def test_poison_request_fails_after_one_retry_on_another_decode_instance() -> None:
    router, _, decodes = _router("colocated")
    outs = run(collect(router, _req("bad", POISON)))
    assert [o.finish_reason for o in outs] == ["error"]
    assert "failed twice" in outs[0].error and "RuntimeError: nan" in outs[0].error
    tried = [d.worker_id for d in decodes if d.calls]
    assert len(tried) == 2, f"replayed on {tried}: at most one retry, on another instance"
    assert (router.num_retried, router.num_poison) == (1, 1)
    assert all(d.healthy for d in router.decode.instances.values()), "a poison request took an instance out"
    assert_idle(router)
    outs = run(collect(router, _req("good", FINE)))  # the pool still serves
    assert tokens(outs) == expected_tokens(FINE, 5) and outs[-1].finish_reason == "length"


def test_innocent_request_in_a_failed_batch_succeeds_on_its_retry() -> None:
    router, _, decodes = _router("colocated", num_decode=1)
    decodes[0].flaky = 1  # the step that carried it failed once (because of another request)
    outs = run(collect(router, _req("ok", FINE)))
    assert tokens(outs) == expected_tokens(FINE, 5) and outs[-1].finish_reason == "length"
    assert (router.num_retried, router.num_poison) == (1, 0)


def test_poison_prompt_fails_at_prefill_after_one_retry() -> None:
    router, prefills, decodes = _router("disaggregated", num_prefill=3, num_decode=1)
    outs = run(collect(router, _req("bad", POISON)))
    assert [o.finish_reason for o in outs] == ["error"] and "failed twice" in outs[0].error
    assert sum(len(p.calls) for p in prefills) == 2 and len({p.worker_id for p in prefills if p.calls}) == 2
    assert not decodes[0].calls
    assert (router.num_retried, router.num_poison) == (1, 1)
    assert_idle(router)
