"""One pool of instances (prefill or decode) as the router tracks it: clients, health, load, stats.

The router's own counts (prompt tokens it sent to an instance and not yet got back, requests it is
streaming from it) are exact and current; the polled `WorkerStats` lag by the poll interval. A
policy sees the polled snapshot with the router's counts folded in (`Instance.snapshot`).
Health (`Instance.state`): an instance is `dead` when a call raises `WorkerDeadError` (Ray says the
actor or its node died), `unavailable` when one raises `WorkerUnavailableError` (Ray could not reach
it for now) or its own stats say it is unhealthy; either takes it out of dispatch but keeps it
registered, and it is `healthy` again when a later `stats()` answers (the node came back, Ray
restarted the actor behind the same handle, or it was re-registered). Only deaths count as failures.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from pdserve.prefix_keys import chain_keys
from pdserve.router.policies import Policy
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.errors import WorkerDeadError, WorkerUnavailableError
from pdserve.router.protocols import DecodeClient, PrefillClient
from pdserve.types import GenerateRequest, WorkerStats

Role = Literal["prefill", "decode"]
State = Literal["healthy", "unavailable", "dead"]
STATES: tuple[State, ...] = ("healthy", "unavailable", "dead")
C = TypeVar("C", PrefillClient, DecodeClient)


@dataclass
class Instance(Generic[C]):
    worker_id: str
    client: C
    stats: WorkerStats
    state: State = "healthy"
    num_inflight: int = 0  # requests this router is running on it right now
    outstanding_tokens: int = 0  # prompt tokens sent to it and not yet answered

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"

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
    num_failures: int = 0  # transitions to dead seen
    num_unavailable: int = 0  # healthy -> unavailable transitions seen (Ray could not reach it)
    # With prefix caching on the instances: the router's guess of what each caches (block keys of
    # `prefix_block_size` tokens), fed by its own dispatches and read by the cache-aware policies.
    prefix: PrefixIndex | None = None
    prefix_block_size: int = 16
    _polling: asyncio.Future[None] | None = field(default=None, repr=False)

    def add(self, worker_id: str, client: C) -> None:
        """Register an instance, healthy with empty stats. Registering an id again swaps in the new
        client (a replacement actor); requests still on the old one keep their counts here."""
        inst = self.instances.get(worker_id)
        if inst is None:
            self.instances[worker_id] = Instance(worker_id, client, WorkerStats(worker_id))
        else:
            inst.client, inst.stats, inst.state = client, WorkerStats(worker_id), "healthy"
        if self.prefix is not None:
            self.prefix.forget(worker_id)  # a new or replaced instance starts with an empty cache

    def remove(self, worker_id: str) -> None:
        self.instances.pop(worker_id, None)

    def healthy(self) -> list[Instance[C]]:
        return [i for i in self.instances.values() if i.healthy]

    def pick(self, req: GenerateRequest, avoid: str | None = None) -> Instance[C] | None:
        """The policy's choice among healthy instances (other than `avoid` while there are others),
        or None if there is none; counted as a dispatch to it (`commit`)."""
        chosen = self.choose(req, avoid)
        if chosen is None:
            return None
        self.commit(req, chosen[0])
        return chosen[0]

    def choose(self, req: GenerateRequest, avoid: str | None = None) -> tuple[Instance[C], int] | None:
        """As `pick`, with the prompt tokens the chosen instance is believed to cache (0 without a
        prefix index), but no dispatch recorded: the caller `commit`s if it sends the request there."""
        candidates = self.healthy()
        if not candidates:
            return None
        candidates = [i for i in candidates if i.worker_id != avoid] or candidates
        snaps = [i.snapshot() for i in candidates]
        keys = [] if self.prefix is None else chain_keys(req.prompt_token_ids, self.prefix_block_size)
        if keys:
            snaps = [dataclasses.replace(s, expected_hit_tokens=self._expected_hits(i, keys))
                     for i, s in zip(candidates, snaps)]
        chosen = self.policy(req, snaps, self.num_dispatched)
        hits = next(s.expected_hit_tokens for s in snaps if s.worker_id == chosen)
        return self.instances[chosen], hits

    def commit(self, req: GenerateRequest, inst: Instance[C]) -> None:
        """`req` goes to `inst`: one dispatch more (round robin's tick), and its prompt's blocks are
        believed cached there from now on."""
        self.num_dispatched += 1
        self.remember(inst.worker_id, req.prompt_token_ids)

    def remember(self, worker_id: str, token_ids: tuple[int, ...]) -> None:
        """The instance now caches `token_ids` (a finished request's prompt and output): their full
        blocks count as hits for the next turn of the conversation. No-op without a prefix index."""
        if self.prefix is not None:
            self.prefix.record(worker_id, chain_keys(token_ids, self.prefix_block_size))

    def _expected_hits(self, inst: Instance[C], keys: list[bytes]) -> int:
        assert self.prefix is not None
        if inst.stats.num_total_blocks > 1:  # polled: the instance's cache holds this many blocks
            self.prefix.set_capacity(inst.worker_id, inst.stats.num_total_blocks)
        return self.prefix.hit_blocks(inst.worker_id, keys) * self.prefix_block_size

    def counts(self) -> dict[str, int]:
        """Instances per state, and in all (what /health shows per pool)."""
        states = [i.state for i in self.instances.values()]
        return {s: states.count(s) for s in STATES} | {"total": len(states)}

    def mark_dead(self, worker_id: str, client: C, error: WorkerDeadError | None = None) -> None:
        """A call on `client` raised `error`: the instance is dead, or only unavailable when `error` is
        a `WorkerUnavailableError` (no-op when it has since been replaced by another client)."""
        inst = self.instances.get(worker_id)
        if inst is None or inst.client is not client or inst.state == "dead":
            return
        if isinstance(error, WorkerUnavailableError):
            if inst.state == "healthy":
                inst.state = "unavailable"
                self.num_unavailable += 1
            return
        inst.state = "dead"
        self.num_failures += 1
        if self.prefix is not None:
            self.prefix.forget(worker_id)  # whatever comes back behind this id has lost its cache

    async def refresh(self, timeout_s: float) -> None:
        """Poll every instance's stats concurrently. A dead or unreachable one turns dead or
        unavailable, an answering one healthy (or unavailable, per its own `healthy` flag); one that
        does not answer in time keeps its state.
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
                inst.stats, inst.state = res, "healthy" if res.healthy else "unavailable"
            elif isinstance(res, WorkerDeadError):
                self.mark_dead(inst.worker_id, client, res)
            elif not isinstance(res, Exception):
                raise res  # CancelledError / KeyboardInterrupt are not a worker's state
