"""DecodeActor: the Ray shell around DecodeWorker. Owns the step thread and output streaming only.

`generate` is a streaming-generator method: the router iterates it and gets the request's
StepOutputs as the step thread produces them. A consumer that goes away aborts the request.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import ray

from pdserve.config import ServingConfig
from pdserve.decode.build import build_decode_worker
from pdserve.engine.pipeline import RankLayout
from pdserve.kvtransfer.reach import Endpoint, probe_socket
from pdserve.runtime.lockstep import LockStep
from pdserve.runtime.shell import WorkerShell
from pdserve.types import GenerateRequest, RequestId, StepOutput

if TYPE_CHECKING:
    from pdserve.kvtransfer.types import KVHandle


class DecodeActor(WorkerShell):
    def __init__(self, cfg: ServingConfig, worker_id: str, rank: int = 0) -> None:
        ranks = RankLayout(cfg.decode.tp, cfg.decode.pp, rank)
        super().__init__(ray.util.get_node_ip_address(), cfg, worker_id, ranks)
        self._streams: dict[RequestId, asyncio.Queue[StepOutput]] = {}
        self._probe: socket.socket | None = None

    def _build_worker(self, init_method: str) -> LockStep:
        return build_decode_worker(self.cfg, self.worker_id, self.ranks, init_method, self.listen)

    def _on_outputs(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    async def generate(self, req: GenerateRequest, handle: KVHandle | None) -> AsyncIterator[StepOutput]:
        received = time.monotonic()  # the step thread takes it only between two steps: queued from now
        await self.start()
        if req.request_id in self._streams:  # before registering: the live request keeps its stream
            raise ValueError(f"request_id: {req.request_id!r} is already running on {self.worker_id}")
        stream: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._streams[req.request_id] = stream
        finished = False
        try:
            await self._steps.call(self.worker.submit, req, handle, received)
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            del self._streams[req.request_id]
            if not finished:  # the consumer went away (or submit failed): free everything it held
                self._steps.submit(self.worker.abort, req.request_id)

    async def first_token(self, request_id: RequestId, token_ids: tuple[int, ...]) -> bool:
        """A streamed handoff's first token(s) (DecodeWorker.first_token)."""
        await self.start()
        return await self._steps.call(self.worker.first_token, request_id, token_ids)

    async def abort(self, request_id: RequestId) -> None:
        await self.start()
        if await self._steps.call(self.worker.abort, request_id):
            self._on_outputs([StepOutput(request_id, (), "", "abort")])  # ends the request's stream

    async def open_kv_probe(self) -> Endpoint:
        """Listen where this instance's torch-transport pairs will (address and port range) until
        `close_kv_probe`, so launch can check that prefill nodes reach it."""
        if self._probe is None:
            self._probe = probe_socket(self.listen)
        return Endpoint(self.worker_id, self.node_ip, "rendezvous", self.listen.addr(self._probe.getsockname()[1]))

    async def close_kv_probe(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
