"""Joint SLO attainment over a list of RequestRecords, and how far the SLOs would have to scale.

Attainment is over *all* requests: a failed request misses the SLO. A run's whole summary
(attainment, goodput, latency percentiles) is bench/summary.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pdserve.bench.record import RequestRecord
from pdserve.bench.units import fmt_duration
from pdserve.config import SLOConfig

EPS = 1e-9


def describe_slo(slo: SLOConfig, scale: float = 1.0) -> str:
    """`TTFT <= 250 ms, TPOT <= 50 ms for 90% (SLO scale 1x)`; `scale` says how these SLOs
    relate to the ones a run was made with."""
    return (f"TTFT <= {fmt_duration(slo.ttft_s)}, TPOT <= {fmt_duration(slo.tpot_s)} for "
            f"{100 * slo.attainment:g}% (SLO scale {scale:g}x)")


def meets(record: RequestRecord, slo: SLOConfig) -> bool:
    if not record.ok or record.ttft_s is None:
        return False
    tpot = record.tpot_s
    return record.ttft_s <= slo.ttft_s and (tpot is None or tpot <= slo.tpot_s)


def attainment(records: Sequence[RequestRecord], slo: SLOConfig) -> float:
    """Share of all requests (failed included) meeting both SLOs; 0 for no requests."""
    return sum(meets(r, slo) for r in records) / len(records) if records else 0.0


def slo_scale_needed(record: RequestRecord, slo: SLOConfig) -> float:
    """The smallest scale s such that the request meets slo.scaled(s); inf if it failed."""
    if not record.ok or record.ttft_s is None:
        return math.inf
    tpot = record.tpot_s
    return max(record.ttft_s / slo.ttft_s, 0.0 if tpot is None else tpot / slo.tpot_s)


def min_slo_scale(records: Sequence[RequestRecord], slo: SLOConfig) -> float:
    """Smallest scale s at which attainment(records, slo.scaled(s)) >= slo.attainment: the
    k-th smallest per-request need, k = ceil(target * N). inf when too many requests failed."""
    if not records:
        return math.inf
    needs = sorted(slo_scale_needed(r, slo) for r in records)
    k = math.ceil(slo.attainment * len(needs) - EPS)
    return needs[max(k, 1) - 1]
