"""WorkerShell: the lifecycle both role actors share — lazy start, rendezvous, stats, health.

A role actor subclasses it and supplies `_build_worker(init_method)` (on a thread: it loads
weights and returns the rank's LockStep, whatever the world size) and `_on_outputs(outputs)` (on
the event loop: hand results to waiting callers). Everything else a caller needs is here, once.
"""

from __future__ import annotations

import asyncio
import socket
from abc import ABC, abstractmethod
from typing import Any

from pdserve.config import ServingConfig
from pdserve.engine.pipeline import RankLayout
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.reach import Endpoint, unreachable
from pdserve.runtime.lockstep import LockStep, make_step_loop
from pdserve.runtime.step_loop import StepLoop, deliver_threadsafe
from pdserve.types import StepRecord, WorkerStats


class WorkerShell(ABC):
    worker: LockStep
    _steps: StepLoop

    def __init__(self, node_ip: str, cfg: ServingConfig, worker_id: str, ranks: RankLayout) -> None:
        """Cheap: weights load in start(). `node_ip` is this node's address as Ray knows it (what KV
        endpoints bind and advertise); `ranks` this actor's place in its tp x pp instance."""
        self.node_ip, self.cfg, self.worker_id, self.ranks = node_ip, cfg, worker_id, ranks
        self._starting: asyncio.Future[None] | None = None

    async def start(self, init_method: str = "") -> None:
        """Load weights and start the step thread. Idempotent; every method calls it, so an actor
        that Ray restarted (which re-runs only __init__) loads itself on its first call. Ranks of a
        tp × pp instance all get rank 0's `rendezvous()` and run in lock-step (runtime/lockstep.py)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start(init_method))
        await asyncio.shield(self._starting)

    @property
    def listen(self) -> Listen:
        """Where this instance's KV endpoints bind, and the address they advertise."""
        return Listen.resolve(self.cfg.kvtransfer, self.node_ip)

    def rendezvous(self) -> str:
        return free_init_method(self.node_ip)  # this node's IP: ranks on other nodes (placement.node_groups) dial it

    async def _start(self, init_method: str) -> None:
        self._loop = asyncio.get_running_loop()
        self.worker = await asyncio.to_thread(self._build_worker, init_method)
        self._steps = make_step_loop(self.worker, self._deliver)
        self._steps.start()

    @abstractmethod
    def _build_worker(self, init_method: str) -> LockStep:
        """On a thread: load weights and return this rank's lock-step around its worker."""

    @abstractmethod
    def _on_outputs(self, outputs: list[Any]) -> None:
        """On the event loop: hand a step's outputs to the callers waiting for them."""

    def _deliver(self, outputs: list[Any]) -> None:
        deliver_threadsafe(self._loop, self._on_outputs, outputs)

    async def stats(self) -> WorkerStats:
        await self.start()
        return await self._steps.call(self.worker.stats)

    async def step_log(self, since: int = 0) -> tuple[int, list[StepRecord]]:
        """This instance's engine steps numbered `since` onwards, and the number of the first."""
        await self.start()
        return await self._steps.call(self.worker.step_log, since)

    async def check_kv_peers(self, targets: list[Endpoint]) -> None:
        """Raise ConnectionError, naming address, port and node, unless this node reaches every
        KV endpoint in `targets` (launch's connectivity check between the pools)."""
        errors = await asyncio.to_thread(unreachable, targets, self.cfg.kvtransfer.connect_timeout_s)
        if errors:
            raise ConnectionError(f"{self.worker_id} on node {self.node_ip}: " + "; ".join(errors))

    async def check_health(self) -> None:
        await self.start()
        self._steps.check()


def free_init_method(host: str) -> str:
    """A `tcp://host:port` rendezvous on a port free right now (rank 0 picks it, launch shares it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"
