"""The load generator: replays a workload against an endpoint at scheduled arrival times.

Every request is launched at its arrival time (open loop: a slow server does not slow the
arrivals), optionally capped by a client concurrency limit, and each yields exactly one
RequestRecord, failed or not, in workload order.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from pdserve.bench.arrivals import arrival_times
from pdserve.bench.client import Endpoint, send_request
from pdserve.bench.record import RequestRecord
from pdserve.bench.workload import WorkloadRequest


@dataclass(frozen=True)
class LoadConfig:
    rate: float  # req/s; inf sends every request at once
    cv: float = 1.0  # Gamma inter-arrival CV; 1 = Poisson
    seed: int = 0
    max_concurrency: int | None = None  # None: unbounded (open loop)
    timeout_s: float = 600.0  # per request, from sending it to the end of its stream
    progress: bool = True


@dataclass(frozen=True)
class LoadResult:
    rate: float
    records: list[RequestRecord]
    duration_s: float  # first arrival to last completion


async def run_load(endpoint: Endpoint, workload: Sequence[WorkloadRequest], cfg: LoadConfig) -> LoadResult:
    offsets = arrival_times(len(workload), cfg.rate, cfg.cv, cfg.seed)
    records = [RequestRecord(i, w.prompt_len, w.output_len, t) for i, (w, t) in enumerate(zip(workload, offsets))]
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = _progress_bar(len(workload), cfg)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0)
    # The total request timeout is ours (send_request); aiohttp's would also cut queued requests.
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        start = time.perf_counter() + 0.05

        async def one(req: WorkloadRequest, record: RequestRecord) -> None:
            arrival = start + record.arrival_s
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            if limit is None:
                await send_request(session, endpoint, req, record, arrival, cfg.timeout_s)
            else:
                async with limit:
                    await send_request(session, endpoint, req, record, arrival, cfg.timeout_s)
            if bar is not None:
                bar.update(1)

        try:
            await asyncio.gather(*(one(w, r) for w, r in zip(workload, records)))
        finally:
            if bar is not None:
                bar.close()
        duration = time.perf_counter() - start
    return LoadResult(cfg.rate, records, duration)


def _progress_bar(total: int, cfg: LoadConfig):  # -> tqdm | None
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"rate {cfg.rate:g} req/s", unit="req", file=sys.stderr, leave=False)
