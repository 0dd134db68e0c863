"""`RequestStream`: the outputs of one admitted request, as `Router.submit` returns them (router/core.py)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

from pdserve.types import RequestId, StepOutput


class RequestStream:
    """The outputs of one admitted request. `aclose()` (or leaving `async with`) before the end aborts
    it on every worker; the last output carries the request's LatencyBreakdown in `latency`."""

    def __init__(self, request_id: RequestId, outputs: AsyncGenerator[StepOutput, None],
                 release: Callable[[], Awaitable[None]]) -> None:
        """`outputs`: the request's life in the router; `release`: frees it there (idempotent)."""
        self.request_id = request_id
        self._gen, self._release = outputs, release

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()
        await self._release()  # when never iterated, the generator had no finally

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
