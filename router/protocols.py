"""The router's view of a worker instance: `PrefillClient` and `DecodeClient`.

The router core talks only to these protocols; `router/actor.py` adapts Ray actor handles to them and
tests pass in-process fakes. Their calls fail with the error kinds of `router/errors.py`. The
`Streaming*` variants add layer-wise KV streaming (router/layerwise.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Protocol

from pdserve.types import GenerateRequest, PrefillResult, RequestId, StepOutput, WorkerStats

if TYPE_CHECKING:
    from pdserve.kvtransfer.types import KVHandle


class PrefillClient(Protocol):
    """One prefill instance, as the router sees it."""

    worker_id: str

    async def prefill(self, req: GenerateRequest) -> PrefillResult:
        """Run the prompt, return the first token and a handle on the KV that now waits to be pulled.

        `result.handle` is None when the request finished at its first token or failed (then
        `result.first.finish_reason == "error"`). The instance keeps the KV pinned until a decode
        instance pulls it, the request is aborted, or its lease expires. Raises `WorkerDeadError` if
        the instance is gone (the router then tries another one), `RequestFailedError` if only this
        request failed. Cancelling the awaiting task does not abort the request: call `abort`.
        """
        ...

    async def abort(self, request_id: RequestId) -> None:
        """Drop the request and free its blocks. Unknown or finished ids are a no-op.

        Raises `WorkerDeadError` if the instance is gone (which frees everything anyway).
        """
        ...

    async def stats(self) -> WorkerStats:
        """A fresh snapshot for dispatch policies. Raises `WorkerDeadError` if the instance is gone."""
        ...


class DecodeClient(Protocol):
    """One decode instance (or, in colocated mode, one instance that does both phases)."""

    worker_id: str

    def generate(self, req: GenerateRequest, handle: KVHandle | None) -> AsyncGenerator[StepOutput, None]:
        """Continue `req` and stream its outputs; the last one has `finish_reason` set.

        With a `handle`, the instance pulls the prompt's KV from the prefill instance that holds it.
        With `handle=None` it computes the prefill itself (colocated mode, or recompute after a
        failure). `req.output_token_ids` holds every token the client has already received (in
        disaggregated mode, at least the first token from prefill); the instance continues after
        them and never emits them again, and `max_tokens` counts them. The first output carries
        the instance's part of the request's `latency` (a LatencyBreakdown: its pull, or its prefill).
        Iteration raises `WorkerDeadError` if the instance dies, at any point, including before the
        first output. Closing the iterator early does not abort the request: call `abort`.
        """
        ...

    async def abort(self, request_id: RequestId) -> None:
        """Drop the request and free its blocks; its stream ends with finish_reason "abort" or simply
        stops. Unknown or finished ids are a no-op. Raises `WorkerDeadError` if the instance is gone.
        """
        ...

    async def stats(self) -> WorkerStats:
        """A fresh snapshot for dispatch policies. Raises `WorkerDeadError` if the instance is gone."""
        ...


class StreamingPrefillClient(PrefillClient, Protocol):
    """A prefill instance that streams KV layer by layer (`kvtransfer.layerwise`)."""

    def prefill_stream(self, req: GenerateRequest) -> AsyncGenerator[KVHandle | PrefillResult, None]:
        """As `prefill`, but yields the request's `KVHandle` as soon as the KV is exported, before the
        forward that writes it (decode may pull at once: each layer is served once written), then
        the `PrefillResult` (its `handle` is the same one, or None if the request ended or failed:
        the export is released then). An instance that does not stream this request yields only the
        result. Raises as `prefill`; closing the stream early does not abort the request."""
        ...


class StreamingDecodeClient(DecodeClient, Protocol):
    """A decode instance that takes layer-wise (streamed) handoffs."""

    async def first_token(self, request_id: RequestId, token_ids: tuple[int, ...]) -> bool:
        """The first token(s) prefill sampled for a request that `generate` got with a handle covering
        all of its tokens (a streamed handoff: it runs only after this). False if the instance no
        longer holds the request (it failed or was aborted). Raises `WorkerDeadError` if it is gone."""
        ...
