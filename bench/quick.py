"""Short benchmarks for other commands: SLOs calibrated from unloaded latency, and the few-rate
goodput run `pdserve demo` ends with."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from pdserve.bench.client import Endpoint
from pdserve.bench.loadgen import LoadConfig, run_load
from pdserve.bench.metrics import SLO
from pdserve.bench.record import RequestRecord
from pdserve.bench.runner import BenchConfig, BenchResult, run_rates, save
from pdserve.bench.tokenizer import load_tokenizer
from pdserve.bench.workload import WorkloadRequest, WorkloadSpec, build_workload


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
    ttfts = [r.ttft_s for r in records if r.ok and r.ttft_s is not None]
    tpots = [t for r in records if (t := r.tpot_s) is not None]
    if not ttfts or not tpots:
        errors = {r.error for r in records if r.error}
        raise ValueError(f"unloaded latency: no request completed with 2+ tokens ({'; '.join(errors) or 'no error'})")
    return statistics.median(ttfts), statistics.median(tpots)


def slo_from_unloaded(endpoint: Endpoint, workload: Sequence[WorkloadRequest], ttft_factor: float,
                      tpot_factor: float, attainment: float = 0.9) -> SLO:
    ttft, tpot = unloaded_latency(endpoint, workload)
    return SLO(ttft * ttft_factor, tpot * tpot_factor, attainment)


def quick_benchmark(url: str, model: str | None = None, tokenizer: str | None = None,
                    rates: Sequence[float] = (0.5, 1.0, 2.0), num_requests: int = 16,
                    slo: SLO | None = None, gpus: float = 1.0, out_dir: str | Path | None = None,
                    log: Callable[[str], None] = print) -> BenchResult:
    """A small ShareGPT run (prompts <= 256 tokens, outputs <= 32) at a few rates; SLOs default
    to 4x the unloaded TTFT and 2x the unloaded TPOT; the tokenizer defaults to the model's.
    Prints (through `log`) and returns the goodput table. Call it from synchronous code."""
    endpoint = Endpoint(url, model=model)
    spec = WorkloadSpec("sharegpt", num_requests, seed=0, max_input_len=256, max_output_len=32)
    workload = build_workload(spec, load_tokenizer(tokenizer or model or "smollm2-135m"))
    if slo is None:
        slo = slo_from_unloaded(endpoint, workload, 4.0, 2.0)
    cfg = BenchConfig(endpoint, slo, gpus, LoadConfig(rate=1.0, progress=False), warmup=1, label="quick")
    result = run_rates(cfg, workload, rates, log=log)
    if out_dir is not None:
        save(result, out_dir, workload, {"name": spec.name, "seed": spec.seed})
    log(result.table())
    return result
