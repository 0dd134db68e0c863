"""PrefillActor: the Ray shell around PrefillWorker. Owns the step thread and result hand-off only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import ray

from pdserve.config import ServingConfig
from pdserve.engine.pipeline import RankLayout
from pdserve.kvtransfer.reach import Endpoint, endpoints
from pdserve.prefill.build import build_prefill_worker
from pdserve.prefill.early_handles import EarlyHandles
from pdserve.runtime.lockstep import LockStep
from pdserve.runtime.shell import WorkerShell
from pdserve.runtime.step_loop import deliver_threadsafe
from pdserve.types import GenerateRequest, PrefillResult, RequestId, StepOutput

if TYPE_CHECKING:
    from pdserve.kvtransfer.types import KVHandle


class PrefillActor(WorkerShell):
    def __init__(self, cfg: ServingConfig, worker_id: str, rank: int = 0) -> None:
        ranks = RankLayout(cfg.prefill.tp, cfg.prefill.pp, rank)
        super().__init__(ray.util.get_node_ip_address(), cfg, worker_id, ranks)
        self._waiting: dict[RequestId, asyncio.Future[PrefillResult]] = {}
        self._exported = EarlyHandles()

    def _build_worker(self, init_method: str) -> LockStep:
        worker = build_prefill_worker(self.cfg, self.worker_id, self.ranks, init_method, self.listen)
        if self.cfg.layerwise_kv:  # tp × pp = 1: hand each KV handle out before its forward
            worker.worker.stream_exports(lambda hs: deliver_threadsafe(self._loop, self._exported.handles, hs))
        return worker

    def _on_outputs(self, results: list[PrefillResult]) -> None:
        for r in results:
            fut = self._waiting.pop(r.first.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(r)

    async def prefill(self, req: GenerateRequest) -> PrefillResult:
        received = time.monotonic()  # the step thread takes it only between two steps: queued from now
        await self.start()
        if req.request_id in self._waiting:  # before registering: the live request keeps its future
            raise ValueError(f"request_id: {req.request_id!r} is already queued on {self.worker_id}")
        fut = self._loop.create_future()
        self._waiting[req.request_id] = fut
        try:
            await self._steps.call(self.worker.submit, req, received)
            return await fut
        except BaseException:
            # Bad request, or the caller was cancelled: drop any state and blocks the request holds.
            # (A result that already exported KV is released by the lease if nobody pulls it.)
            self._waiting.pop(req.request_id, None)
            self._steps.submit(self.worker.abort, req.request_id)
            raise

    async def prefill_stream(self, req: GenerateRequest) -> AsyncIterator[KVHandle | PrefillResult]:
        """Streaming-generator method (layer-wise KV streaming): the KV handle as soon as the KV is
        exported, then the result (router/protocols.py StreamingPrefillClient)."""
        await self.start()
        async for item in self._exported.stream(req.request_id, self.prefill(req)):
            yield item

    async def abort(self, request_id: RequestId) -> None:
        await self.start()
        if await self._steps.call(self.worker.abort, request_id):
            self._on_outputs([PrefillResult(StepOutput(request_id, (), "", "abort"), None)])

    async def kv_endpoints(self) -> list[Endpoint]:
        """The socket endpoints decode instances dial to pull this instance's KV (every rank's)."""
        await self.start()
        return endpoints(self.worker_id, self.node_ip, self.worker.worker.sender.addresses)
