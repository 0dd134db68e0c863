"""Goodput: the highest arrival rate at which a deployment still meets the attainment target.

Bisection on rate over one fixed trace (common random numbers: every rate and every candidate
sees the same requests, scaled in time). The bracket starts from an SLO-independent capacity
guess and doubles until a rate fails, so for a fixed trace a tighter SLO never yields a higher
goodput (each probe's attainment can only drop, and bisection then only moves left).
"""

from __future__ import annotations

from typing import Literal

from pdserve.bench.metrics import SLO
from pdserve.placement.deployment import Deployment, SimResult
from pdserve.placement.simulator import simulate
from pdserve.placement.workload import Trace

Metric = Literal["joint", "ttft", "tpot"]


def attained(slo: SLO, result: SimResult, metric: Metric = "joint") -> float:
    """Share of simulated requests meeting `slo` (both SLOs, or only one of them for a phase alone)."""
    if metric == "ttft":
        return result.ttft_attainment(slo.ttft_s)
    if metric == "tpot":
        return result.tpot_attainment(slo.tpot_s)
    return result.attainment(slo.ttft_s, slo.tpot_s)


def capacity_guess(dep: Deployment, trace: Trace) -> float:
    """A rough requests/s the deployment sustains, from mean lengths (only seeds the bracket)."""
    n = len(trace)
    p = sum(trace.prompt_lens) / n
    o = sum(trace.output_lens) / n
    prefill = sum(1.0 / max(i.prefill_stage_s(p, p * p), 1e-9) for i in dep.prefill)
    decoders = dep.decode if dep.mode == "disaggregated" else dep.prefill
    decode = 0.0
    for inst in decoders:
        batch = max(1, min(dep.max_num_seqs, int(dep.decode_capacity(inst) / (p + o))))
        lanes = inst.pp if dep.mode == "disaggregated" else 1
        per_lane = max(1, batch // lanes)
        decode += lanes * per_lane / inst.profile.decode_s(per_lane * (p + o / 2), per_lane) / o
    if dep.phases == "prefill":
        return prefill
    if dep.phases == "decode":
        return decode
    return min(prefill, decode) if dep.mode == "disaggregated" else 1.0 / (1.0 / prefill + 1.0 / decode)


def goodput(dep: Deployment, trace: Trace, slo: SLO, metric: Metric = "joint",
            rel_tol: float = 0.02, max_doublings: int = 12) -> float:
    """Max rate (req/s) with attainment >= slo.attainment, within `rel_tol`; 0 if even a tiny
    rate fails (e.g. a prompt that alone exceeds the TTFT SLO for more than 1 − target)."""

    def ok(rate: float) -> bool:
        return attained(slo, simulate(dep, trace, rate), metric) >= slo.attainment

    lo, hi = 0.0, max(capacity_guess(dep, trace), 1e-6) * 0.5
    for _ in range(max_doublings):
        if not ok(hi):
            break
        lo, hi = hi, hi * 2
    else:
        return lo
    if lo == 0.0:  # failed at the first guess: look lower before bisecting
        floor = hi / 64
        if not ok(floor):
            return 0.0
        lo = floor
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
