"""Simulating multi-turn serving: sessions in closed loop, prefix caches, and the router's own
cache-aware dispatch. `ReuseColocatedSim` here; the disaggregated and conditional modes in
sim_cond.py. `simulate()` takes these when the trace has sessions (`SessionTrace`) or the
deployment turns reuse on (`SimDeployment.models_reuse`).

What `SessionReuse` adds to a simulation:
  - closed loop: turn k > 0 of a session arrives when turn k−1 produced its last token plus the
    turn's think time (an event the simulation schedules), not at a drawn time;
  - one `PrefixCacheModel` per instance (prefix_model.py), filled when a request finishes (its
    prompt and answer) on the instance that decoded it and, disaggregated, when a prompt is
    prefilled on a prefill instance; a request's prompt computes only what its instance lacks
    (`Simulation.cached`), and a pull moves only what the decode instance lacks;
  - dispatch by router/policies.py's functions themselves (`least_kv_pressure`,
    `least_outstanding_tokens`, or `cache_aware_*` with each instance's hit as
    `WorkerStats.expected_hit_tokens`): the router guesses hits from its own dispatch history,
    which is what the modelled cache holds, so the simulator reads the truth where the router
    reads a guess;
  - counters (`ReuseStats`) of prompt tokens, hits, KV tokens pulled and local prefills.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pdserve.placement.prefix_model import PrefixCacheModel
from pdserve.placement.sessions import SessionTrace, as_sessions
from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.trace import RouterDispatch
from pdserve.placement.workload import Trace
from pdserve.router.policies import Policy, cache_aware_decode, least_kv_pressure
from pdserve.types import GenerateRequest, RequestId, WorkerStats


@dataclass
class ReuseStats:
    """Token counts over a simulation (prompt tokens of every request that started)."""

    prompt_tokens: int = 0
    prefill_hit_tokens: int = 0  # cached on the instance that prefilled it (or the colocated engine)
    decode_hit_tokens: int = 0  # disaggregated: held by the decode instance, not pulled
    pulled_tokens: int = 0  # KV tokens moved over the links
    num_local: int = 0  # conditional: requests prefilled on their decode instance
    num_remote: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens not computed (prefix hits), over all requests."""
        return self.prefill_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def request_for(prompt_len: int) -> GenerateRequest:
    """A request the policies can read: only its prompt's length matters to them."""
    return GenerateRequest(RequestId("simulated"), (0,) * prompt_len)


class SessionReuse:
    """Mixin for a `Simulation`: closed-loop sessions and prefix caches (see the module doc).
    The host class calls `setup_reuse` in its constructor, appends `on_turn` to its handlers and
    records in `home[r]` the instance whose cache a finished request fills."""

    def setup_reuse(self, trace: Trace, capacities: Sequence[int]) -> None:
        st = trace if isinstance(trace, SessionTrace) else as_sessions(trace)
        self.next_turn, self.think = st.next_turn, st.think_s
        self.reusable, self.shared, self.sid = st.reusable, st.shared_lens, st.session_ids
        self.caches = [PrefixCacheModel(c) for c in capacities] if self.dep.prefix_caching else None
        self.home = [0] * len(trace)
        self.stats = ReuseStats()
        self.turn_kind = len(self.handlers()) - 1  # `on_turn` comes last
        self.on_finish = self.finished
        self.num_timed = 0  # every arrival is an event: turn 0 at its trace time, the others when due
        for r in st.timed:
            self.push(self.arrival[r], self.turn_kind, r)

    def hit(self, cache: PrefixCacheModel | None, r: int) -> int:
        return cache.hit(self.sid[r], self.reusable[r], self.shared[r], self.plen[r]) if cache else 0

    def finished(self, r: int, t: float) -> None:
        if self.caches is not None:
            eng = self.engines[self.home[r]]
            self.caches[self.home[r]].insert(self.sid[r], self.plen[r] + self.olen[r], self.shared[r], eng.reserved)
        k = self.next_turn[r]
        if k >= 0:
            self.push(max(t + self.think[k], self.now), self.turn_kind, k)

    def on_turn(self, r: int, _: object) -> None:
        self.arrival[r] = self.now
        self.on_arrival(r)


class ReuseColocatedSim(SessionReuse, RouterDispatch):
    """Colocated engines with prefix caching: the router's `least_kv_pressure` (or
    `cache_aware_decode` with `cache_aware`) picks the engine, which then computes only the
    uncached part of the prompt (prefill-priority batches or chunks)."""

    def __init__(self, dep: SimDeployment, trace: Trace, rate: float) -> None:
        super().__init__(dep, trace, rate)
        self.setup_reuse(trace, [dep.decode_capacity(e.lat) for e in self.engines])
        self.policy: Policy = cache_aware_decode if dep.cache_aware else least_kv_pressure
        self.arriving = 0

    def handlers(self) -> Sequence[Callable[[object, object], None]]:
        return (self.on_wake, self.on_turn)

    def on_arrival(self, r: int) -> None:
        self.arriving = r
        super().on_arrival(r)

    def pick(self) -> int:
        r, caches = self.arriving, self.caches
        hits = [self.hit(caches[i] if caches else None, r) for i in range(len(self.engines))]
        stats = [self.seen(i) for i in range(len(self.engines))]
        if caches:
            stats = [with_hit(s, h) for s, h in zip(stats, hits)]
        tick = self.num_dispatched
        self.num_dispatched += 1
        ci = int(self.policy(request_for(self.plen[r]), stats, tick))
        self.home[r], self.cached[r] = ci, hits[ci]
        self.stats.prompt_tokens += self.plen[r]
        self.stats.prefill_hit_tokens += hits[ci]
        return ci


def with_hit(s: WorkerStats, hit: int) -> WorkerStats:
    return replace(s, expected_hit_tokens=hit)
