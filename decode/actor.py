"""DecodeActor: the Ray shell around DecodeWorker. Owns the step thread and output streaming only.

`generate` is a streaming-generator method: the router iterates it and gets the request's
StepOutputs as the step thread produces them. A consumer that goes away aborts the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import torch

from pdserve.config import ServingConfig
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.engine.pipeline import RankLayout
from pdserve.lockstep import free_init_method, make_step_loop
from pdserve.steploop import deliver_threadsafe
from pdserve.types import GenerateRequest, RequestId, StepOutput, WorkerStats

if TYPE_CHECKING:
    from pdserve.kvtransfer.types import KVHandle


class DecodeActor:
    def __init__(self, cfg: ServingConfig, worker_id: str, rank: int = 0) -> None:
        self.cfg, self.worker_id = cfg, worker_id  # cheap: weights load in start()
        self.ranks = RankLayout(cfg.decode.tp, cfg.decode.pp, rank)
        self._starting: asyncio.Future[None] | None = None
        self._streams: dict[RequestId, asyncio.Queue[StepOutput]] = {}

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
            from pdserve.decode.ranks import build_decode_rank

            self.worker = await asyncio.to_thread(build_decode_rank, self.cfg, self.worker_id, self.ranks, init_method)
        else:
            self.worker = await asyncio.to_thread(self._build_worker)
        self._steps = make_step_loop(self.worker, self._deliver)
        self._steps.start()

    def _build_worker(self) -> DecodeWorker:
        cfg = self.cfg
        torch.set_num_threads(cfg.engine.num_threads)
        engine = Engine.from_config(cfg.model, cfg.engine)
        receiver = None
        policy = cfg.colocated_policy if cfg.mode == "colocated" else "decode"
        if cfg.mode == "disaggregated":
            from pdserve.kvtransfer.connector import make_receiver

            receiver = make_receiver(cfg.kvtransfer, engine.pool)
        return DecodeWorker(engine, policy, cfg.decode.max_num_seqs, cfg.decode.max_num_batched_tokens,
                            receiver=receiver, worker_id=self.worker_id)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        deliver_threadsafe(self._loop, self._dispatch, outputs)

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    async def generate(self, req: GenerateRequest, handle: KVHandle | None) -> AsyncIterator[StepOutput]:
        await self.start()
        if req.request_id in self._streams:  # before registering: the live request keeps its stream
            raise ValueError(f"request_id: {req.request_id!r} is already running on {self.worker_id}")
        stream: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._streams[req.request_id] = stream
        finished = False
        try:
            await self._steps.call(self.worker.submit, req, handle)
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            del self._streams[req.request_id]
            if not finished:  # the consumer went away (or submit failed): free everything it held
                self._steps.submit(self.worker.abort, req.request_id)

    async def abort(self, request_id: RequestId) -> None:
        await self.start()
        if await self._steps.call(self.worker.abort, request_id):
            self._dispatch([StepOutput(request_id, (), "", "abort")])  # ends the request's stream

    async def stats(self) -> WorkerStats:
        await self.start()
        return await self._steps.call(self.worker.stats)

    async def check_health(self) -> None:
        await self.start()
        self._steps.check()
