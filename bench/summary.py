"""One run's summary: joint and per-SLO attainment, goodput, throughput and latency percentiles.

Attainment is over *all* requests (a failed request misses the SLO, bench/metrics.py); latency
percentiles are over the requests that completed (their count is reported next to them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from pdserve.bench.metrics import EPS, attainment, meets, min_slo_scale
from pdserve.bench.record import RequestRecord
from pdserve.config import SLOConfig

PERCENTILES = (50, 90, 99)


def percentile_stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


@dataclass(frozen=True)
class RunSummary:
    rate: float  # offered load, req/s
    num_requests: int
    num_ok: int
    num_failed: int
    num_short: int  # completed with fewer tokens than requested
    duration_s: float
    attainment: float  # joint TTFT-and-TPOT
    ttft_attainment: float
    tpot_attainment: float
    request_goodput: float  # requests meeting both SLOs per second of the run (vLLM's "goodput")
    output_throughput: float  # output tokens/s of completed requests
    min_slo_scale: float
    ttft_s: dict
    tpot_s: dict
    e2e_s: dict
    itl_s: dict
    server_timings_mean: dict  # mean of each key of the server's breakdown over completed requests (0 if left out)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: Sequence[RequestRecord], slo: SLOConfig, rate: float, duration_s: float) -> RunSummary:
    done = [r for r in records if r.ok]
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    duration = max(duration_s, EPS)
    return RunSummary(
        rate=rate, num_requests=len(records), num_ok=len(done), num_failed=len(records) - len(done),
        num_short=sum(r.short for r in records), duration_s=duration_s,
        attainment=attainment(records, slo),
        ttft_attainment=attainment(records, replace(slo, tpot_s=math.inf)),
        tpot_attainment=attainment(records, replace(slo, ttft_s=math.inf)),
        request_goodput=sum(meets(r, slo) for r in records) / duration,
        output_throughput=sum(r.num_output_tokens for r in done) / duration,
        min_slo_scale=min_slo_scale(records, slo),
        ttft_s=percentile_stats([r.ttft_s for r in done if r.ttft_s is not None]),
        tpot_s=percentile_stats(tpots),
        e2e_s=percentile_stats([r.e2e_s for r in done if r.e2e_s is not None]),
        itl_s=percentile_stats([g for r in done for g in r.itl_s]),
        server_timings_mean=_mean_timings(done),
    )


def _mean_timings(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Mean of each key over the requests that carry a breakdown; a key one of them leaves out counts 0
    there (pdserve omits zero counts and flags: `cached_tokens`, `kv_recomputed`), so a flag's mean is
    the share of requests that raised it."""
    reported = [r.server_timings for r in records if r.server_timings]
    keys = sorted({k for t in reported for k in t})
    return {k: float(np.mean([t.get(k, 0.0) for t in reported])) for k in keys}
