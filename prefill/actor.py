"""PrefillActor: the Ray shell around PrefillWorker. Owns the step thread and result hand-off only."""

from __future__ import annotations

import asyncio

import torch

from pdserve.config import ServingConfig
from pdserve.engine.engine import Engine
from pdserve.engine.pipeline import RankLayout
from pdserve.lockstep import free_init_method, make_step_loop
from pdserve.prefill.worker import PrefillWorker
from pdserve.steploop import deliver_threadsafe
from pdserve.types import GenerateRequest, PrefillResult, RequestId, StepOutput, WorkerStats


class PrefillActor:
    def __init__(self, cfg: ServingConfig, worker_id: str, rank: int = 0) -> None:
        self.cfg, self.worker_id = cfg, worker_id  # cheap: weights load in start()
        self.ranks = RankLayout(cfg.prefill.tp, cfg.prefill.pp, rank)
        self._starting: asyncio.Future[None] | None = None
        self._waiting: dict[RequestId, asyncio.Future[PrefillResult]] = {}

    async def start(self, init_method: str = "") -> None:
        """Load weights and start the step thread. Idempotent; every method calls it, so an actor
        that Ray restarted (which re-runs only __init__) loads itself on its first call. Ranks of a
        tp × pp instance all get rank 0's `rendezvous()` and run in lock-step (pdserve/lockstep.py)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start(init_method))
        await asyncio.shield(self._starting)

    def rendezvous(self) -> str:
        return free_init_method("127.0.0.1")  # STRICT_PACK: an instance's ranks share a node

    async def _start(self, init_method: str) -> None:
        self._loop = asyncio.get_running_loop()
        if self.ranks.world_size > 1:
            from pdserve.prefill.ranks import build_prefill_rank

            self.worker = await asyncio.to_thread(build_prefill_rank, self.cfg, self.worker_id, self.ranks, init_method)
        else:
            self.worker = await asyncio.to_thread(self._build_worker)
        self._steps = make_step_loop(self.worker, self._deliver)
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
        if req.request_id in self._waiting:  # before registering: the live request keeps its future
            raise ValueError(f"request_id: {req.request_id!r} is already queued on {self.worker_id}")
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
