"""EarlyHandles: the prefill actor's side of layer-wise KV streaming. Plain asyncio, no Ray.

The worker exports a prompt's KV before the forward that writes it and passes the handles to
`handles` (on the actor's event loop, via the step loop's deliver); `stream` yields a request's
handle as soon as it comes, then the request's `PrefillResult`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING

from pdserve.types import PrefillResult, RequestId

if TYPE_CHECKING:
    from pdserve.kvtransfer.types import KVHandle


class EarlyHandles:
    def __init__(self) -> None:
        self._waiting: dict[RequestId, asyncio.Future[KVHandle]] = {}

    def handles(self, handles: list[KVHandle]) -> None:
        """On the event loop: these exports exist now (their forward is about to run)."""
        for h in handles:
            fut = self._waiting.pop(RequestId(h.request_id), None)
            if fut is not None and not fut.done():
                fut.set_result(h)

    async def stream(self, request_id: RequestId,
                     result: Awaitable[PrefillResult]) -> AsyncIterator[KVHandle | PrefillResult]:
        """Await `result` (the request's prefill, started here), yielding the request's handle first
        if it is exported before the result comes. Closing the stream early cancels `result` (the
        prefill call then aborts the request on the worker). Raises what `result` raises, or
        ValueError if `request_id` is already streaming here."""
        if request_id in self._waiting:
            raise ValueError(f"request_id: {request_id!r} is already queued here")
        fut: asyncio.Future[KVHandle] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        task = asyncio.ensure_future(result)
        try:
            await asyncio.wait({fut, task}, return_when=asyncio.FIRST_COMPLETED)
            if fut.done():
                yield fut.result()
            yield await task
        finally:
            if self._waiting.get(request_id) is fut:
                del self._waiting[request_id]
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
