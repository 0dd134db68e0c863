"""PrefillActor: the Ray shell around PrefillWorker. Owns the step thread and result hand-off only."""

from __future__ import annotations

import asyncio
import time

import ray

from pdserve.config import ServingConfig
from pdserve.engine.pipeline import RankLayout
from pdserve.kvtransfer.reach import Endpoint, endpoints
from pdserve.prefill.build import build_prefill_worker
from pdserve.runtime.lockstep import LockStep
from pdserve.runtime.shell import WorkerShell
from pdserve.types import GenerateRequest, PrefillResult, RequestId, StepOutput


class PrefillActor(WorkerShell):
    def __init__(self, cfg: ServingConfig, worker_id: str, rank: int = 0) -> None:
        ranks = RankLayout(cfg.prefill.tp, cfg.prefill.pp, rank)
        super().__init__(ray.util.get_node_ip_address(), cfg, worker_id, ranks)
        self._waiting: dict[RequestId, asyncio.Future[PrefillResult]] = {}

    def _build_worker(self, init_method: str) -> LockStep:
        return build_prefill_worker(self.cfg, self.worker_id, self.ranks, init_method, self.listen)

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

    async def abort(self, request_id: RequestId) -> None:
        await self.start()
        if await self._steps.call(self.worker.abort, request_id):
            self._on_outputs([PrefillResult(StepOutput(request_id, (), "", "abort"), None)])

    async def kv_endpoints(self) -> list[Endpoint]:
        """The socket endpoints decode instances dial to pull this instance's KV (every rank's)."""
        await self.start()
        return endpoints(self.worker_id, self.node_ip, self.worker.worker.sender.addresses)
