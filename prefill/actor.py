"""PrefillActor: the Ray shell around PrefillWorker. Owns the step thread and result hand-off only."""

from __future__ import annotations

import asyncio

import torch

from pdserve.config import ServingConfig
from pdserve.engine.engine import Engine
from pdserve.prefill.worker import PrefillWorker
from pdserve.steploop import StepLoop, deliver_threadsafe
from pdserve.types import GenerateRequest, PrefillResult, RequestId, StepOutput, WorkerStats


class PrefillActor:
    def __init__(self, cfg: ServingConfig, worker_id: str) -> None:
        self.cfg, self.worker_id = cfg, worker_id  # cheap: weights load in start()
        self._starting: asyncio.Future[None] | None = None
        self._waiting: dict[RequestId, asyncio.Future[PrefillResult]] = {}

    async def start(self) -> None:
        """Load weights and start the step thread. Idempotent; every method calls it, so an actor
        that Ray restarted (which re-runs only __init__) loads itself on its first call."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.worker = await asyncio.to_thread(self._build_worker)
        self._steps = StepLoop(self.worker.step, self.worker.has_work, self._deliver)
        self._steps.start()

    def _build_worker(self) -> PrefillWorker:
        from pdserve.kvtransfer.connector import make_sender

        cfg = self.cfg
        torch.set_num_threads(cfg.engine.num_threads)
        engine = Engine.from_config(cfg.model, cfg.engine)
        sender = make_sender(cfg.kvtransfer, engine.pool, engine.allocator)
        return PrefillWorker(engine, cfg.prefill.max_num_seqs, cfg.prefill.max_num_batched_tokens,
                             sender, worker_id=self.worker_id)

    def _deliver(self, results: list[PrefillResult]) -> None:
        deliver_threadsafe(self._loop, self._resolve, results)

    def _resolve(self, results: list[PrefillResult]) -> None:
        for r in results:
            fut = self._waiting.pop(r.first.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(r)

    async def prefill(self, req: GenerateRequest) -> PrefillResult:
        await self.start()
        fut = self._loop.create_future()
        self._waiting[req.request_id] = fut
        try:
            await self._steps.call(self.worker.submit, req)
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
            self._resolve([PrefillResult(StepOutput(request_id, (), "", "abort"), None)])

    async def stats(self) -> WorkerStats:
        await self.start()
        return await self._steps.call(self.worker.stats)

    async def check_health(self) -> None:
        await self.start()
        self._steps.check()
