"""EarlyHandles (the prefill actor's layer-wise streaming): the handle comes before the result, a
request that exports nothing yields only its result, and closing the stream cancels the prefill."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.prefill.early_handles import EarlyHandles
from pdserve.types import PrefillResult, RequestId, StepOutput

RID = RequestId("r")


def _result(handle: object) -> PrefillResult:
    return PrefillResult(StepOutput(RID, (7,)), handle)  # type: ignore[arg-type]


async def _collect(early: EarlyHandles, result: asyncio.Future[PrefillResult]) -> list[object]:
    return [item async for item in early.stream(RID, result)]


def test_the_handle_comes_first_then_the_result() -> None:
    async def main() -> list[object]:
        early, result = EarlyHandles(), asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(_collect(early, result))
        await asyncio.sleep(0)
        early.handles([_Handle("other"), _Handle(RID)])  # before the forward
        await asyncio.sleep(0)
        result.set_result(_result(_Handle(RID)))
        return await task
    assert asyncio.run(main()) == [_Handle(RID), _result(_Handle(RID))]


def test_no_export_yields_only_the_result_and_errors_propagate() -> None:
    async def main() -> list[object]:
        early, result = EarlyHandles(), asyncio.get_running_loop().create_future()
        result.set_result(_result(None))
        items = await _collect(early, result)
        failing = asyncio.get_running_loop().create_future()
        failing.set_exception(ValueError("prompt: too long"))
        with pytest.raises(ValueError, match="too long"):
            await _collect(early, failing)
        assert not early._waiting  # nothing left registered
        return items
    assert asyncio.run(main()) == [_result(None)]


def test_closing_the_stream_cancels_the_prefill() -> None:
    async def main() -> bool:
        early = EarlyHandles()
        prefill = asyncio.ensure_future(asyncio.sleep(60))
        stream = early.stream(RID, prefill)  # type: ignore[arg-type]
        it = stream.__aiter__()
        first = asyncio.ensure_future(it.__anext__())
        await asyncio.sleep(0)
        early.handles([_Handle(RID)])
        assert await first == _Handle(RID)
        await stream.aclose()  # the router went away before the result
        return prefill.cancelled()
    assert asyncio.run(main())


class _Handle:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Handle) and other.request_id == self.request_id

    def __hash__(self) -> int:
        return hash(self.request_id)
