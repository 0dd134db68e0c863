"""Goodput: the highest arrival rate at which a deployment still meets the attainment target in
steady state.

Bisection on rate over one fixed trace (common random numbers: every rate and every candidate
sees the same requests, scaled in time). The bracket's top is `MAX_LOAD` × `bound.service_bound`
(capped by the caller's hardware bound): above the bound queues grow without limit, so a finite
trace that still meets the SLOs there is a burst, not a sustainable rate. The first `WARMUP` of the requests
(arriving into an empty system) are not counted. For a fixed trace a tighter SLO never yields a
higher goodput (the bracket does not depend on the SLO, each probe's attainment can only drop,
and bisection then only moves left).
"""

from __future__ import annotations

import math
from typing import Literal

from pdserve.config import SLOConfig
from pdserve.placement.bound import LengthStats, max_batch, service_bound
from pdserve.placement.sim_deployment import SimDeployment, SimResult
from pdserve.placement.simulator import simulate
from pdserve.placement.workload import Trace

Metric = Literal["joint", "ttft", "tpot"]
WARMUP = 0.1  # share of a trace's first requests not counted (the system starts empty)
STEADY_FACTOR = 4  # requests per decode slot a steady-state simulation needs (`steady_len`)
MAX_REQUESTS = 20_000
MAX_LOAD = 0.9
"""Highest share of `service_bound` a goodput may reach: at load ρ queueing delay grows as
1/(1 − ρ) and near 1 a queue drifts without a steady state, so a finite trace there overstates
what a long run sustains (BENCHMARKS.md: the 10×-trace check)."""


def attained(slo: SLOConfig, result: SimResult, metric: Metric = "joint") -> float:
    """Share of simulated requests meeting `slo` (both SLOs, or only one of them for a phase alone)."""
    if metric == "ttft":
        return result.ttft_attainment(slo.ttft_s)
    if metric == "tpot":
        return result.tpot_attainment(slo.tpot_s)
    return result.attainment(slo.ttft_s, slo.tpot_s)


def steady_len(dep: SimDeployment, trace: Trace, base: int) -> int:
    """Requests a simulation of `dep` needs to reach steady state: at least `base`, and
    `STEADY_FACTOR` times the requests its decode batches hold at once (a trace shorter than
    that never fills them, and a burst looks sustainable) up to `MAX_REQUESTS`. A prefill
    phase alone gets what one decode instance of `max_num_seqs` would, so both phases of a
    search (and a 1P+1D unit) see the same requests."""
    st = LengthStats.of(trace)
    decoders = dep.prefill if dep.mode == "colocated" else dep.decode
    in_flight = sum(max_batch(dep, i, st) for i in decoders) if dep.phases != "prefill" else dep.max_num_seqs
    return max(base, min(MAX_REQUESTS, STEADY_FACTOR * in_flight))


def counted(result: SimResult) -> SimResult:
    """The requests that count towards attainment: all but the first `WARMUP` (by arrival)."""
    k = int(len(result.ttft_s) * WARMUP)
    return SimResult(result.ttft_s[k:], result.tpot_s[k:]) if k else result


def goodput(dep: SimDeployment, trace: Trace, slo: SLOConfig, metric: Metric = "joint",
            rel_tol: float = 0.02, max_rate: float | None = None, near: float | None = None) -> float:
    """Max rate (req/s) with attainment >= slo.attainment, within `rel_tol`, and at most
    `MAX_LOAD` × `service_bound` (and `max_rate`, e.g. `bound.hardware_bound`); 0 if even a tiny rate fails
    (e.g. a prompt that alone exceeds the TTFT SLO for more than 1 − target). `near` (a share of
    the top, e.g. 0.85): the answer is expected just below the top, so that point is tried first."""

    def ok(rate: float) -> bool:
        return attained(slo, counted(simulate(dep, trace, rate)), metric) >= slo.attainment

    hi = min(MAX_LOAD * service_bound(dep, trace), max_rate if max_rate is not None else math.inf)
    if not math.isfinite(hi):  # nothing to do per request (e.g. decode alone, all one-token outputs)
        hi = 1e6
    if ok(hi):
        return hi
    lo = hi * near if near else hi / 64
    if not ok(lo):
        if not near:
            return 0.0
        hi, lo = lo, lo / 64
        if not ok(lo):
            return 0.0
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
