"""One pool of instances (prefill or decode) as the router tracks it: clients, health, load, stats.

The router's own counts (prompt tokens it sent to an instance and not yet got back, requests it is
streaming from it) are exact and current; the polled `WorkerStats` lag by the poll interval. A
policy sees the polled snapshot with the router's counts folded in (`Instance.snapshot`).
Health: an instance turns unhealthy when a call raises `WorkerDeadError`, and healthy again when a
later `stats()` answers (Ray restarted the actor behind the same handle, or it was re-registered).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from pdserve.router.policies import Policy
from pdserve.router.protocols import DecodeClient, PrefillClient, WorkerDeadError
from pdserve.types import GenerateRequest, WorkerStats

Role = Literal["prefill", "decode"]
C = TypeVar("C", PrefillClient, DecodeClient)


@dataclass
class Instance(Generic[C]):
    worker_id: str
    client: C
    stats: WorkerStats
    healthy: bool = True
    num_inflight: int = 0  # requests this router is running on it right now
    outstanding_tokens: int = 0  # prompt tokens sent to it and not yet answered

    def snapshot(self) -> WorkerStats:
        # Exact local counts replace the lagging polled ones; the waiting/running split of the
        # in-flight requests comes from the poll (it only matters as a sum).
        waiting = min(self.stats.num_waiting, self.num_inflight)
        return dataclasses.replace(self.stats, worker_id=self.worker_id, num_running=self.num_inflight - waiting,
                                   num_waiting=waiting, outstanding_tokens=self.outstanding_tokens)


@dataclass
class Pool(Generic[C]):
    role: Role
    policy: Policy
    instances: dict[str, Instance[C]] = field(default_factory=dict)
    num_dispatched: int = 0
    num_failures: int = 0  # healthy -> dead transitions seen
    _polling: asyncio.Future[None] | None = field(default=None, repr=False)

    def add(self, worker_id: str, client: C) -> None:
        """Register an instance, healthy with empty stats. Registering an id again swaps in the new
        client (a replacement actor); requests still on the old one keep their counts here."""
        inst = self.instances.get(worker_id)
        if inst is None:
            self.instances[worker_id] = Instance(worker_id, client, WorkerStats(worker_id))
        else:
            inst.client, inst.stats, inst.healthy = client, WorkerStats(worker_id), True

    def remove(self, worker_id: str) -> None:
        self.instances.pop(worker_id, None)

    def healthy(self) -> list[Instance[C]]:
        return [i for i in self.instances.values() if i.healthy]

    def pick(self, req: GenerateRequest, avoid: str | None = None) -> Instance[C] | None:
        """The policy's choice among healthy instances (other than `avoid` while there are others),
        or None if there is none."""
        candidates = self.healthy()
        if not candidates:
            return None
        candidates = [i for i in candidates if i.worker_id != avoid] or candidates
        chosen = self.policy(req, [i.snapshot() for i in candidates], self.num_dispatched)
        self.num_dispatched += 1
        return self.instances[chosen]

    def mark_dead(self, worker_id: str, client: C) -> None:
        """`client` failed: the instance is dead unless it has since been replaced by another client."""
        inst = self.instances.get(worker_id)
        if inst is not None and inst.client is client and inst.healthy:
            inst.healthy = False
            self.num_failures += 1

    async def refresh(self, timeout_s: float) -> None:
        """Poll every instance's stats concurrently. A dead one turns unhealthy, an answering one
        healthy (per its own `healthy` flag); one that does not answer in time keeps its state.
        Concurrent callers (many requests waiting for a failover) share one poll."""
        if self._polling is None or self._polling.done():
            self._polling = asyncio.ensure_future(self._poll(timeout_s))
        await asyncio.shield(self._polling)

    async def _poll(self, timeout_s: float) -> None:
        polled = [(i, i.client) for i in self.instances.values()]
        results = await asyncio.gather(*(asyncio.wait_for(c.stats(), timeout_s) for _, c in polled),
                                       return_exceptions=True)
        for (inst, client), res in zip(polled, results, strict=True):
            if inst.client is not client:
                continue  # replaced while we polled
            if isinstance(res, WorkerStats):
                inst.stats, inst.healthy = res, res.healthy
            elif isinstance(res, WorkerDeadError):
                self.mark_dead(inst.worker_id, client)
            elif not isinstance(res, Exception):
                raise res  # CancelledError / KeyboardInterrupt are not a worker's state
