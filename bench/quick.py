"""Short benchmarks for other commands: SLOs calibrated from unloaded latency, and the few-rate
goodput run `pdserve demo` ends with."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pdserve.bench.client import Endpoint
from pdserve.bench.loadgen import LoadConfig, run_load
from pdserve.bench.record import RequestRecord
from pdserve.bench.runner import BenchConfig, BenchResult, extend_range, run_rates, save
from pdserve.bench.tokenizer import load_tokenizer
from pdserve.bench.units import fmt_duration
from pdserve.bench.workload import WorkloadRequest, WorkloadSpec, build_workload
from pdserve.config import SLOConfig


def unloaded_records(endpoint: Endpoint, workload: Sequence[WorkloadRequest], num_requests: int = 5,
                     timeout_s: float = 600.0) -> list[RequestRecord]:
    """`num_requests` requests sent one at a time, after one more that warms the server up and
    is not returned."""
    import asyncio

    load = LoadConfig(rate=math.inf, max_concurrency=1, timeout_s=timeout_s, progress=False)
    return asyncio.run(run_load(endpoint, list(workload[:num_requests + 1]), load)).records[1:]


def unloaded_latency(endpoint: Endpoint, workload: Sequence[WorkloadRequest], num_requests: int = 5,
                     timeout_s: float = 600.0) -> tuple[float, float]:
    """(median TTFT, median TPOT) in seconds of `unloaded_records`."""
    return median_latency(unloaded_records(endpoint, workload, num_requests, timeout_s))


def median_latency(records: Sequence[RequestRecord]) -> tuple[float, float]:
    """(median TTFT, median TPOT) of the requests that completed with 2+ tokens."""
    return latency_quantile(records, 0.5)


def latency_quantile(records: Sequence[RequestRecord], q: float) -> tuple[float, float]:
    """(TTFT, TPOT) at quantile `q` (0.5: the median) of the requests that completed with 2+ tokens."""
    ttfts = [r.ttft_s for r in records if r.ok and r.ttft_s is not None]
    tpots = [t for r in records if (t := r.tpot_s) is not None]
    if not ttfts or not tpots:
        errors = {r.error for r in records if r.error}
        raise ValueError(f"unloaded latency: no request completed with 2+ tokens ({'; '.join(errors) or 'no error'})")
    return float(np.quantile(ttfts, q)), float(np.quantile(tpots, q))


def slo_from_unloaded(endpoint: Endpoint, workload: Sequence[WorkloadRequest], ttft_factor: float,
                      tpot_factor: float, attainment: float = 0.9) -> SLOConfig:
    ttft, tpot = unloaded_latency(endpoint, workload)
    return SLOConfig(ttft * ttft_factor, tpot * tpot_factor, attainment)


# The quick benchmark's SLOs: these multiples of the unloaded latency that `attainment` of its
# requests reach (its 90th percentile by default). A median-based SLO fails the longest prompts
# of a ShareGPT sample even with no load, so goodput would be 0 at every rate.
QUICK_SLO_FACTORS = (4.0, 2.0)  # (TTFT, TPOT), DistServe's usual looseness
# Rates, as multiples of the rate one-at-a-time service sustains (1 / mean unloaded E2E): half of
# it queues little, twice it needs batching; the default system's goodput lies in between.
QUICK_RATE_FACTORS = (0.5, 1.0, 2.0)


def quick_benchmark(url: str, model: str | None = None, tokenizer: str | None = None,
                    rates: Sequence[float] | None = None, num_requests: int = 20,
                    slo: SLOConfig | None = None, gpus: float | None = None, out_dir: str | Path | None = None,
                    log: Callable[[str], None] = print) -> BenchResult:
    """A small ShareGPT run (prompts <= 256 tokens, outputs <= 32) at a few rates. Unless given,
    SLOs and rates come from the same requests sent one at a time first (QUICK_SLO_FACTORS,
    QUICK_RATE_FACTORS; when the goodput lies outside them, one point at half the lowest or twice
    the highest is added), and `gpus` from the server's /v1/models; the tokenizer defaults to the model's. Prints (through `log`) and returns the goodput table. Call it from synchronous code."""
    from pdserve.bench.served_model import served_model

    served = served_model(url)
    gpus = gpus or served.num_gpus or 1.0
    endpoint = Endpoint(url, model=model or served.id)
    spec = WorkloadSpec("sharegpt", num_requests, seed=0, max_input_len=256, max_output_len=32)
    workload = build_workload(spec, load_tokenizer(tokenizer or model or served.id or "smollm2-135m"))
    derived_rates = rates is None
    if slo is None or rates is None:
        log(f"unloaded: {len(workload) - 1} requests one at a time ...")
        unloaded = unloaded_records(endpoint, workload, len(workload) - 1)
        attain = slo.attainment if slo else 0.9
        if slo is None:
            ttft, tpot = latency_quantile(unloaded, attain)
            slo = SLOConfig(ttft * QUICK_SLO_FACTORS[0], tpot * QUICK_SLO_FACTORS[1], attain)
            log(f"SLOs: TTFT <= {fmt_duration(slo.ttft_s)}, TPOT <= {fmt_duration(slo.tpot_s)} "
                f"({QUICK_SLO_FACTORS[0]:g}x, {QUICK_SLO_FACTORS[1]:g}x the unloaded p{100 * attain:g})")
        if rates is None:
            e2e = [r.e2e_s for r in unloaded if r.ok and r.e2e_s]
            if not e2e:
                raise ValueError(f"unloaded latency: no request completed ({unloaded[0].error if unloaded else 'none sent'})")
            sequential = 1 / statistics.fmean(e2e)
            rates = [round(f * sequential, 3) for f in QUICK_RATE_FACTORS]
            log(f"rates: {', '.join(f'{r:g}' for r in rates)} req/s "
                f"({', '.join(f'{f:g}' for f in QUICK_RATE_FACTORS)}x the {sequential:.3f} req/s of one-at-a-time "
                f"service); GPUs: {gpus:g}" + (f" ({served.shape})" if served.shape else ""))
    cfg = BenchConfig(endpoint, slo, gpus, LoadConfig(rate=1.0, progress=False), warmup=1, label="quick")
    result = run_rates(cfg, workload, rates, log=log)
    if derived_rates:  # rates of our own choosing must bracket the goodput; given ones are kept as given
        result = extend_range(cfg, workload, result, log=log)
    if out_dir is not None:
        save(result, out_dir, workload, {"name": spec.name, "seed": spec.seed})
    log(result.table())
    return result
