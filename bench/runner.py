"""A benchmark: warm up, run the workload at each rate (or search for the goodput), analyse,
write the results directory, print a table.

The same workload and the same arrival pattern (scaled by the rate) are replayed at every rate,
so points differ only in load (common random numbers).
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pdserve.bench.client import Endpoint
from pdserve.bench.goodput import Goodput, goodput_from_curve, slo_scale_curve
from pdserve.bench.loadgen import LoadConfig, LoadResult, run_load
from pdserve.bench.metrics import describe_slo, slo_scale_needed
from pdserve.bench.summary import RunSummary, summarize
from pdserve.bench.units import fmt_duration
from pdserve.bench.workload import WorkloadRequest
from pdserve.config import SLOConfig

SLO_SCALES = tuple(round(0.1 * i, 1) for i in range(50, 0, -1))  # 5.0, 4.9, ..., 0.1


@dataclass(frozen=True)
class BenchConfig:
    endpoint: Endpoint
    slo: SLOConfig
    gpus: float = 1.0  # GPUs (or GPU-equivalents) of the deployment, for per-GPU goodput
    load: LoadConfig = field(default_factory=lambda: LoadConfig(rate=1.0))  # rate is set per point
    warmup: int = 1  # unmeasured sequential requests before the first point
    label: str | None = None


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    points: list[tuple[LoadResult, RunSummary]]  # by increasing rate
    goodput: Goodput

    def table(self) -> str:
        gpus = self.config.gpus
        lines = [(f"{'rate':>8} {'/GPU':>7} {'attain':>7} {'TTFT p50':>9} {'TTFT p90':>9} "
                  f"{'TPOT p50':>9} {'TPOT p90':>9} {'failed':>6}")]
        for _, s in self.points:
            lines.append(f"{s.rate:8.3f} {s.rate / gpus:7.3f} {100 * s.attainment:6.1f}% "
                         f"{_ms(s.ttft_s['p50'])} {_ms(s.ttft_s['p90'])} {_ms(s.tpot_s['p50'])} "
                         f"{_ms(s.tpot_s['p90'])} {s.num_failed:6d}")
        for _, s in self.points:
            if s.server_timings_mean:
                parts = ", ".join(f"{k.removesuffix('_s')} {fmt_duration(v) if k.endswith('_s') else f'{v:.0f}'}"
                                  for k, v in s.server_timings_mean.items())
                lines.append(f"server breakdown at {s.rate:g} req/s (mean): {parts}")
        slo = self.config.slo
        lines.append(f"goodput at {100 * slo.attainment:g}% attainment of TTFT <= {fmt_duration(slo.ttft_s)} and "
                     f"TPOT <= {fmt_duration(slo.tpot_s)}: {self.goodput.describe()}")
        return "\n".join(lines)


def run_rates(cfg: BenchConfig, workload: Sequence[WorkloadRequest], rates: Sequence[float],
              log: Callable[[str], None] = print, after: Callable[[float | None], None] | None = None) -> BenchResult:
    """Warm up, then measure each rate in increasing order. `after(rate)` runs after each point
    (and `after(None)` after the warm-up), e.g. to collect the server's own records of that point."""
    _warm_up(cfg, workload)
    points = []
    for r in [None, *sorted(rates)]:
        if r is not None:
            points.append(_measure(cfg, workload, r, log))
        if after is not None:
            after(r)
    return _result(cfg, points)


def search_goodput(cfg: BenchConfig, workload: Sequence[WorkloadRequest], start_rate: float = 1.0,
                   bisect_steps: int = 3, log: Callable[[str], None] = print) -> BenchResult:
    """Double (or halve) the rate from `start_rate` until attainment crosses the target, then
    bisect `bisect_steps` times; goodput is interpolated over every point measured."""
    _warm_up(cfg, workload)
    target = cfg.slo.attainment
    points: list[tuple[LoadResult, RunSummary]] = []

    def ok(rate: float) -> bool:
        points.append(_measure(cfg, workload, rate, log))
        return points[-1][1].attainment >= target

    lo, hi = (start_rate, None) if ok(start_rate) else (None, start_rate)
    for _ in range(8):  # bracket: at most 256x above or below the start
        if lo is not None and hi is None:
            lo, hi = (lo * 2, None) if ok(lo * 2) else (lo, lo * 2)
        elif hi is not None and lo is None:
            lo, hi = (hi / 2, hi) if ok(hi / 2) else (None, hi / 2)
    if lo is not None and hi is not None:
        for _ in range(bisect_steps):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return _result(cfg, sorted(points, key=lambda p: p[1].rate))


def extend_range(cfg: BenchConfig, workload: Sequence[WorkloadRequest], result: BenchResult,
                 max_points: int = 1, log: Callable[[str], None] = print) -> BenchResult:
    """While the goodput lies outside the rates measured, measure one more rate on that side, at most
    `max_points` times: half the lowest when even it missed the target ("below_range"), twice the
    highest when even it met it ("above_range"). A few fixed rates then bracket the goodput."""
    points = list(result.points)
    for _ in range(max_points):
        if result.goodput.bracket == "below_range":
            lowest = min(s.rate for _, s in points)
            log(f"even {lowest:g} req/s missed the target: measuring {lowest / 2:g} req/s too")
            points.insert(0, _measure(cfg, workload, lowest / 2, log))
        elif result.goodput.bracket == "above_range":
            highest = max(s.rate for _, s in points)
            log(f"even {highest:g} req/s met the target: measuring {2 * highest:g} req/s too")
            points.append(_measure(cfg, workload, 2 * highest, log))
        else:
            break
        result = _result(cfg, points)
    return result


def _measure(cfg: BenchConfig, workload: Sequence[WorkloadRequest], rate: float,
             log: Callable[[str], None]) -> tuple[LoadResult, RunSummary]:
    result = asyncio.run(run_load(cfg.endpoint, workload, replace(cfg.load, rate=rate)))
    summary = summarize(result.records, cfg.slo, rate, result.duration_s)
    log(f"rate {rate:.3f} req/s: attainment {100 * summary.attainment:.1f}%, "
        f"{summary.num_failed} failed, {result.duration_s:.1f} s")
    return result, summary


def _warm_up(cfg: BenchConfig, workload: Sequence[WorkloadRequest]) -> None:
    if cfg.warmup <= 0:
        return
    warm = [replace(w, output_len=min(w.output_len, 4)) for w in workload[:cfg.warmup]]
    load = replace(cfg.load, rate=math.inf, max_concurrency=1, progress=False)
    records = asyncio.run(run_load(cfg.endpoint, warm, load)).records
    if not any(r.ok for r in records):
        raise ValueError(f"endpoint {cfg.endpoint.url} failed the warm-up request: {records[0].error}")


def _result(cfg: BenchConfig, points: list[tuple[LoadResult, RunSummary]]) -> BenchResult:
    curve = [(s.rate, s.attainment) for _, s in points]
    return BenchResult(cfg, points, goodput_from_curve(curve, cfg.slo.attainment, cfg.gpus))


def save(result: BenchResult, out_dir: str | Path, workload: Sequence[WorkloadRequest],
         workload_meta: dict) -> Path:
    from pdserve.bench import plots
    from pdserve.bench.results import write_results

    cfg = result.config
    summary = {
        "label": cfg.label or Path(out_dir).name,
        "endpoint": {"url": cfg.endpoint.base_url, "path": cfg.endpoint.path, "model": cfg.endpoint.model},
        "workload": {**workload_meta, "num_requests": len(workload),
                     "mean_prompt_len": statistics.fmean(w.prompt_len for w in workload),
                     "mean_output_len": statistics.fmean(w.output_len for w in workload)},
        "slo": asdict(cfg.slo), "gpus": cfg.gpus, "cv": cfg.load.cv, "seed": cfg.load.seed,
        "max_concurrency": cfg.load.max_concurrency,
        "points": [s.to_dict() for _, s in result.points],
        "goodput": result.goodput.to_dict(),
    }
    out = write_results(out_dir, summary, {r.rate: r.records for r, _ in result.points},
                        [w.lengths() for w in workload])
    series = [(f"{r.rate / cfg.gpus:.3g} req/s/GPU", r.records) for r, _ in result.points]
    sub = f"{summary['label']}, {cfg.gpus:g} GPUs; {describe_slo(cfg.slo)}"
    plots.plot_attainment([(summary["label"], [(s.rate / cfg.gpus, s.attainment) for _, s in result.points])],
                          cfg.slo.attainment, out / "attainment.png", subtitle=sub)
    plots.plot_latency_cdfs(cdf_series(series), cfg.slo.ttft_s, cfg.slo.tpot_s, out / "latency_cdf.png",
                            subtitle=sub)
    plots.plot_slo_scale([(label, slo_curve(records, cfg.slo)) for label, records in series],
                         cfg.slo.attainment, out / "slo_scale.png", subtitle=sub)
    return out


def cdf_series(series: Sequence[tuple[str, Sequence]]) -> list[tuple[str, list[float], list[float]]]:
    return [(label, [r.ttft_s for r in records if r.ok and r.ttft_s is not None],
             [t for r in records if (t := r.tpot_s) is not None]) for label, records in series]


def slo_curve(records: Sequence, slo: SLOConfig) -> list[tuple[float, float]]:
    return slo_scale_curve([slo_scale_needed(r, slo) for r in records], SLO_SCALES)


def _ms(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value * 1e3:7.1f}ms"
