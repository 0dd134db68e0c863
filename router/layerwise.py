"""The decode stream of a layer-wise (streamed) handoff, opened before prefill sampled the first token.

With `kvtransfer.layerwise`, a prefill instance hands the router the request's `KVHandle` before
the forward that writes the KV (`StreamingPrefillClient.prefill_stream`); the router dispatches the
request to a decode instance at once, so decode admits the pull and pulls each layer as the forward
writes it, and sends the first token after it (`StreamingDecodeClient.first_token`). `EarlyDecode`
holds that decode stream from dispatch on: it is already running (the instance got the request),
and either becomes the router's first decode attempt (`take`) or is closed (`close`): prefill
failed, the request ended at its first token, or decode lost it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from pdserve.router.pool import Instance
from pdserve.types import StepOutput


class EarlyDecode:
    """A decode instance's output stream for one request, started now (the request is dispatched
    even though nobody iterates yet). `inst.num_inflight` counts it until `take` or `close`."""

    def __init__(self, inst: Instance[Any], stream: AsyncGenerator[StepOutput, None]) -> None:
        self.inst, self._stream = inst, stream
        self._first: asyncio.Future[StepOutput] = asyncio.ensure_future(anext(stream))
        self._open = True

    def take(self) -> tuple[Instance[Any], AsyncGenerator[StepOutput, None]]:
        """The instance and its whole stream (from its first output); the caller closes the stream
        and takes over `inst.num_inflight`."""
        self._open = False
        return self.inst, self._outputs()

    async def _outputs(self) -> AsyncGenerator[StepOutput, None]:
        try:
            try:
                out = await self._first
            except StopAsyncIteration:
                return
            yield out
            async for out in self._stream:
                yield out
        finally:
            await self._discard()

    async def close(self) -> None:
        """Stop listening (the caller aborts the request on the instance). Idempotent."""
        if self._open:
            self._open = False
            self.inst.num_inflight -= 1
            await self._discard()

    async def _discard(self) -> None:
        if not self._first.done():
            self._first.cancel()
        await asyncio.gather(self._first, return_exceptions=True)  # retrieve its outcome: never "never retrieved"
        await self._stream.aclose()
