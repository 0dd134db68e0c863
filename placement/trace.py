"""Replaying a recorded trace through the simulator: exact arrival times and lengths instead of a
sampled workload, per-step overheads folded into a profile, and the router's own dispatch.

`simulate()` draws nothing when handed a `Trace` whose arrivals are already in seconds and run at
rate 1, so a measured run is replayed as `replay(dep, recorded_trace(...))`. What this module adds
to the simulator, and why the comparison with a real run needs it:

  - `recorded_trace`: arrivals sorted (the simulator needs them increasing) with the permutation
    back to the recorded order, so per-request results line up with the records.
  - `with_step_overhead`: the serving loop's fixed cost per engine step (scheduling, sampling,
    streaming outputs through Ray) that a profile of bare forwards does not contain.
  - `RouterDispatch` / `DisaggregatedRouterDispatch`: dispatch by the router's own policy functions.
    pdserve's router sends a colocated request where router/policies.py's
    `least_kv_pressure` says (the least KV usage within a tolerance, then the fewest requests in
    flight, ties rotating with the dispatch count); the simulation calls that function. The
    simulator's own colocated dispatch (the least outstanding prompt tokens + reserved KV, ties
    to the lowest index) places requests differently at light load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pdserve.placement.lane import Lane
from pdserve.placement.latency import Coeffs, PhaseProfile
from pdserve.placement.sim_coloc import ColocatedSim
from pdserve.placement.sim_core import DecodeEngine
from pdserve.placement.sim_deployment import SimDeployment, SimResult
from pdserve.placement.sim_disagg import DisaggregatedSim
from pdserve.placement.simulator import simulate
from pdserve.placement.workload import Trace
from pdserve.router.policies import least_kv_pressure, least_outstanding_tokens
from pdserve.types import GenerateRequest, RequestId, WorkerStats

_ANY_REQUEST = GenerateRequest(RequestId("replayed"), ())  # the policy does not read the request


def recorded_trace(arrival_s: Sequence[float], prompt_lens: Sequence[int],
                   output_lens: Sequence[int]) -> tuple[Trace, list[int]]:
    """A trace in seconds (replay it at rate 1) and `order`: trace position k holds recorded
    request order[k]. Ties keep the recorded order."""
    if not (len(arrival_s) == len(prompt_lens) == len(output_lens)) or not arrival_s:
        raise ValueError("recorded trace: need matching, non-empty arrivals and lengths")
    order = sorted(range(len(arrival_s)), key=lambda i: (arrival_s[i], i))
    trace = Trace(tuple(float(arrival_s[i]) for i in order), tuple(int(prompt_lens[i]) for i in order),
                  tuple(int(output_lens[i]) for i in order))
    return trace, order


def in_recorded_order(result: SimResult, order: Sequence[int]) -> SimResult:
    """Undo `recorded_trace`'s sort: element i belongs to recorded request i."""
    ttft, tpot = [0.0] * len(order), [0.0] * len(order)
    for k, i in enumerate(order):
        ttft[i], tpot[i] = result.ttft_s[k], result.tpot_s[k]
    return SimResult(tuple(ttft), tuple(tpot))


def with_step_overhead(profile: PhaseProfile, step_s: float) -> PhaseProfile:
    """Every prefill and decode step costs `step_s` more (the constant term `a` grows)."""
    def add(c: Coeffs) -> Coeffs:
        return Coeffs(c.a + step_s, c.b, c.c)

    return replace(profile, prefill=add(profile.prefill), decode_small=add(profile.decode_small),
                   decode_large=add(profile.decode_large),
                   prefill_tokens=profile.prefill_tokens and profile.prefill_tokens.shifted(step_s),
                   decode_batch=profile.decode_batch and profile.decode_batch.shifted(step_s))


def replay(dep: SimDeployment, trace: Trace, router_dispatch: bool = True) -> SimResult:
    """Simulate `trace` (arrivals in seconds) on `dep`. With `router_dispatch`, requests are
    dispatched as pdserve's router does (`RouterDispatch`, `DisaggregatedRouterDispatch`: the
    router's own policy functions); without, by the simulator's own rules."""
    if not router_dispatch:
        return simulate(dep, trace, 1.0)
    sim = RouterDispatch if dep.mode == "colocated" else DisaggregatedRouterDispatch
    return sim(dep, trace, 1.0).run()


def router_view(ci: int, running: int, waiting: int, reserved: int, capacity: int,
                outstanding: int = 0, hit: int = 0) -> WorkerStats:
    """A simulated instance as the router's policies see it: requests in flight, KV in tokens (as
    blocks of one token: usage = reserved / capacity), prompt tokens outstanding, and the tokens of
    the request being dispatched that it caches (`expected_hit_tokens`)."""
    return WorkerStats(worker_id=str(ci), num_running=running, num_waiting=waiting, num_free_blocks=capacity - reserved,
                       num_total_blocks=capacity, outstanding_tokens=outstanding, expected_hit_tokens=hit)


class DisaggregatedRouterDispatch(DisaggregatedSim):
    """The disaggregated simulation with router/policies.py's `least_outstanding_tokens` choosing
    the prefill instance and `least_kv_pressure` the decode instance, each pool counting its own
    dispatches (the rotation of ties), as the router's pools do. The decode side's KV usage is the
    reserved KV of admitted requests; the router's 0.5 s stats poll is not modelled."""

    def __init__(self, dep: SimDeployment, trace: Trace, rate: float) -> None:
        super().__init__(dep, trace, rate)
        self.num_dispatched = [0, 0]  # prefill, decode

    def _tick(self, pool: int) -> int:
        self.num_dispatched[pool] += 1
        return self.num_dispatched[pool] - 1

    def pick_prefill(self) -> int:
        stats = [router_view(i, 0, len(pre.queue), 0, 1, pre.outstanding) for i, pre in enumerate(self.prefills)]
        return int(least_outstanding_tokens(_ANY_REQUEST, stats, self._tick(0)))

    def pick_decode(self) -> int:
        stats = [router_view(i, dec.running, len(dec.waiting), dec.reserved, self.dep.decode_capacity(dec.lat))
                 for i, dec in enumerate(self.engines)]
        return int(least_kv_pressure(_ANY_REQUEST, stats, self._tick(1)))


class RouterDispatch(ColocatedSim):
    """The colocated simulation with pdserve's router dispatching arrivals: router/policies.py's
    `least_kv_pressure` itself, called on a `WorkerStats` snapshot per instance. KV usage is the
    KV reserved by admitted requests over the instance's capacity, as the router last saw it: an
    instance answers the router's stats poll only between engine steps, so while a
    prefill-priority prefill step runs (up to seconds) the router still sees the usage from
    before it. The 0.5 s poll interval itself is not modelled (decode and chunked steps are
    shorter)."""

    def __init__(self, dep: SimDeployment, trace: Trace, rate: float) -> None:
        super().__init__(dep, trace, rate)
        self.num_dispatched = 0
        self.unseen = [(0.0, 0)] * len(self.engines)  # (until, KV tokens) the router cannot see yet

    def in_flight(self, ci: int) -> int:
        """Dispatched and not finished: admitted (running) + waiting, counting a partly
        chunk-prefilled head of the queue (both admitted and waiting) once."""
        inst = self.engines[ci]
        partial = 1 if inst.waiting and 0 < self.prefilled[inst.waiting[0]] < self.plen[inst.waiting[0]] else 0
        return inst.running + len(inst.waiting) - partial

    def seen(self, ci: int) -> WorkerStats:
        """What the router knows of instance `ci`: requests in flight, and its reserved KV less the
        part it cannot see yet."""
        inst, (until, tokens) = self.engines[ci], self.unseen[ci]
        seen = inst.reserved - (tokens if self.now < until else 0)
        return router_view(ci, self.in_flight(ci), 0, seen, self.dep.decode_capacity(inst.lat))

    def pick(self) -> int:
        stats = [self.seen(i) for i in range(len(self.engines))]
        tick = self.num_dispatched
        self.num_dispatched += 1
        return int(least_kv_pressure(_ANY_REQUEST, stats, tick))

    def prefill_step(self, ci: int, inst: DecodeEngine, lane: Lane) -> None:
        before = inst.reserved
        super().prefill_step(ci, inst, lane)
        self.unseen[ci] = (lane.t0, max(0, inst.reserved - before))  # lane.t0: the prefill step's end
