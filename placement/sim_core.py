"""What both simulated modes share (Vidur's shape: a heap of timed events, each handled by a method
that may schedule more): arrivals merged with the event heap, decode lanes (placement/lane.py)
retiring the requests that finish, and a shared host's slowdown.

`Simulation` is the base of `DisaggregatedSim` (sim_disagg.py) and `ColocatedSim` (sim_coloc.py).
A subclass sets `lane_role` and `engines` (the instances whose lanes run decode iterations) and
provides `on_arrival`, `handlers` (one method per event kind, indexed by the kind pushed),
`on_speed_change` and, when it has instances without lanes, `busy_others`.
Deterministic: same deployment, trace and rate → same result.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
import itertools
from collections import deque
from collections.abc import Callable, Sequence

from pdserve.placement.lane import Lane
from pdserve.placement.latency import InstanceLatency
from pdserve.placement.sim_deployment import SimDeployment, SimResult
from pdserve.placement.workload import Trace

INF = float("inf")
Instance = tuple[str, int]  # ("p" | "d" | "c", index): a prefill, decode or colocated instance


class DecodeEngine:
    """An instance that runs decode lanes (a decode instance, or a colocated engine): the KV tokens
    reserved by admitted requests, the running count, the waiting queue and its KV demand, and
    when its KV link is next free (disaggregated pulls are FIFO per instance)."""

    __slots__ = ("lat", "lanes", "reserved", "running", "waiting", "waiting_tokens", "link_free")

    def __init__(self, lat: InstanceLatency, lanes: list[Lane]) -> None:
        self.lat, self.lanes = lat, lanes
        self.reserved = self.running = self.waiting_tokens = 0
        self.waiting: deque[int] = deque()
        self.link_free = 0.0


class Simulation(ABC):
    lane_role = "d"  # the Instance kind of `engines`
    engines: list[DecodeEngine]

    def __init__(self, dep: SimDeployment, trace: Trace, rate: float) -> None:
        self.dep = dep
        self.arrival = trace.arrivals(rate)
        self.plen, self.olen = trace.prompt_lens, trace.output_lens
        n = len(trace)
        self.first_tok = [INF] * n
        self.tpot = [INF] * n
        self.ctx_off = [0] * n  # a request's context offset in its lane (Lane.add)
        self.cached = [0] * n  # prompt tokens its prefill instance already holds (sim_reuse.py sets them)
        self.num_timed = n  # requests 0..num_timed-1 arrive at their trace times (sessions: 0, all by events)
        self.on_finish: Callable[[int, float], None] | None = None  # sim_reuse.py: request r done at t
        self.heap: list[tuple] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.lanes: list[Lane] = []

    # ---- what a mode provides ------------------------------------------------------------------
    @abstractmethod
    def on_arrival(self, r: int) -> None:
        """Request `r` arrives now."""

    @abstractmethod
    def handlers(self) -> Sequence[Callable[[object, object], None]]:
        """The event handlers, indexed by event kind."""

    @abstractmethod
    def on_speed_change(self, lane: Lane) -> None:
        """A lane's speed changed (already synced): reschedule what depends on its timing."""

    def busy_others(self) -> set[Instance]:
        """Busy instances that have no lanes (disaggregated prefill instances)."""
        return set()


    # ---- the event loop --------------------------------------------------------------------------
    def new_lanes(self, lat: InstanceLatency, owner: int, count: int) -> list[Lane]:
        lanes = [Lane(lat, owner) for _ in range(count)]
        for lane in lanes:
            lane.index = len(self.lanes)
            self.lanes.append(lane)
        return lanes

    def push(self, t: float, kind: int, a: object, b: object = None) -> None:
        heapq.heappush(self.heap, (t, next(self._seq), kind, a, b))

    def run(self) -> SimResult:
        arrival, heap, n, i = self.arrival, self.heap, self.num_timed, 0
        on_arrival, handlers = self.on_arrival, self.handlers()
        while i < n or heap:
            if i < n and (not heap or arrival[i] <= heap[0][0]):
                self.now = arrival[i]
                on_arrival(i)
                i += 1
            else:
                t, _, kind, a, b = heapq.heappop(heap)
                self.now = t
                handlers[kind](a, b)
            if self.dep.host_slowdown:
                self.update_speeds()
        ttft = tuple(f - a for f, a in zip(self.first_tok, arrival))
        return SimResult(ttft, tuple(self.tpot))

    def sync(self, lane: Lane) -> bool:
        """Retire every request finishing at or before now; move the lane to the first
        boundary >= now. Returns whether memory was freed."""
        now, finishes, freed, on_finish = self.now, lane.finishes, False, self.on_finish
        owner = self.engines[lane.owner]
        while finishes:
            fi = finishes[0][0]
            t = lane.time_at(fi)
            if t > now:
                break
            lane.rebase(fi)
            while finishes and finishes[0][0] == fi:
                r = heapq.heappop(finishes)[1]
                lane.remove(self.ctx_off[r])
                self.tpot[r] = (t - self.first_tok[r]) / (self.olen[r] - 1)
                owner.reserved -= self.plen[r] + self.olen[r]
                owner.running -= 1
                freed = True
                if on_finish is not None:
                    on_finish(r, t)
        if lane.num_reqs == 0:
            lane.t0 = max(lane.t0, now)
        else:
            lane.rebase(lane.boundary_at_or_after(now))
        return freed

    # ---- a shared host -----------------------------------------------------------------------------
    def busy_instances(self) -> set[Instance]:
        """Instances computing now: `busy_others`, and those of `engines` with a running batch or
        in a step that carries no decodes (a prefill or a chunk)."""
        now, busy = self.now, self.busy_others()
        for lane in self.lanes:
            if lane.num_reqs or lane.t0 > now:
                busy.add((self.lane_role, lane.owner))
        return busy

    def host_speed(self, me: Instance) -> float:
        """How much longer a step of instance `me` starting now takes (1 unless the host is shared)."""
        if not self.dep.host_slowdown:
            return 1.0
        return 1.0 + self.dep.host_slowdown if self.busy_instances() - {me} else 1.0

    def update_speeds(self) -> None:
        """After an event: lanes whose neighbours' busy state changed switch speed at their next boundary."""
        for lane in self.lanes:
            speed = self.host_speed((self.lane_role, lane.owner))
            if speed == lane.speed:
                continue
            self.sync(lane)
            lane.set_speed(speed)
            self.on_speed_change(lane)
