"""A multi-turn benchmark: replay chat sessions at several session rates and report goodput, per-turn
TTFT and prefix hits (the session counterpart of bench/runner.py).

Rates are new sessions per second. Every rate replays the same sessions with the same start pattern
(scaled by the rate), each set salted apart (`ChatSession.salted`) so a server's prefix cache holds
nothing of the previous point: what it reuses within a point is what the point itself sent. Every
turn is a request for the SLOs: attainment is over all turns, and goodput (read off the attainment
curve as for single turns) is in sessions/s; turns/s is that times the mean turns per session.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pdserve.bench.client import Endpoint
from pdserve.bench.goodput import Goodput, goodput_from_curve
from pdserve.bench.record import RequestRecord
from pdserve.bench.session_load import SessionLoadConfig, TurnRecord, run_sessions
from pdserve.bench.sessions import ChatSession
from pdserve.bench.summary import RunSummary, summarize
from pdserve.bench.turn_stats import TurnStats, first_and_later, turn_stats
from pdserve.bench.units import fmt_duration
from pdserve.config import SLOConfig


@dataclass(frozen=True)
class SessionBenchConfig:
    endpoint: Endpoint  # a chat endpoint
    slo: SLOConfig
    gpus: float = 1.0  # GPUs (or cores) of the deployment, for per-GPU goodput
    load: SessionLoadConfig = field(default_factory=lambda: SessionLoadConfig(rate=1.0))  # rate set per point
    warmup: int = 1  # unmeasured first turns (4 tokens each, one at a time) before the first point
    label: str | None = None


@dataclass(frozen=True)
class SessionPoint:
    records: list[TurnRecord]
    summary: RunSummary  # over every turn; rate in sessions/s
    turns: list[TurnStats]  # by turn index
    groups: list[TurnStats]  # turn 1, turns 2+

    def to_dict(self) -> dict:
        return {**self.summary.to_dict(), "turns": [t.to_dict() for t in self.turns],
                "first_and_later": [t.to_dict() for t in self.groups]}


@dataclass(frozen=True)
class SessionBenchResult:
    config: SessionBenchConfig
    points: list[SessionPoint]  # by increasing session rate
    goodput: Goodput  # sessions/s
    turns_per_session: float

    def table(self) -> str:
        gpus = self.config.gpus
        lines = [f"{'sess/s':>7} {'/GPU':>7} {'attain':>7} {'TTFT t1 p50':>11} {'t2+ p50':>9} {'t2+ p90':>9} "
                 f"{'TPOT p50':>9} {'TPOT p90':>9} {'cached':>7} {'skipped':>7} {'failed':>6}"]
        for p in self.points:
            s, (t1, later) = p.summary, p.groups
            lines.append(f"{s.rate:7.3f} {s.rate / gpus:7.3f} {100 * s.attainment:6.1f}% {_ms(t1.ttft_p50_s, 11)} "
                         f"{_ms(later.ttft_p50_s)} {_ms(later.ttft_p90_s)} {_ms(s.tpot_s['p50'])} "
                         f"{_ms(s.tpot_s['p90'])} {_pct(later.cached_fraction)} {_pct(later.pull_skipped_fraction)} "
                         f"{s.num_failed:6d}")
        for p in self.points:
            if p.summary.server_timings_mean:
                parts = ", ".join(f"{k.removesuffix('_s')} {fmt_duration(v) if k.endswith('_s') else f'{v:.3g}'}"
                                  for k, v in p.summary.server_timings_mean.items())
                lines.append(f"server breakdown at {p.summary.rate:g} sessions/s (mean): {parts}")
        slo = self.config.slo
        lines.append(f"(cached / skipped: share of turn 2+ prompt tokens the server found in its prefix cache / "
                     f"did not pull); {self.turns_per_session:.2f} turns per session")
        lines.append(f"goodput at {100 * slo.attainment:g}% attainment of TTFT <= {fmt_duration(slo.ttft_s)} and "
                     f"TPOT <= {fmt_duration(slo.tpot_s)}: {self.goodput.describe().replace('req/s', 'sessions/s')}")
        return "\n".join(lines)


def run_session_rates(cfg: SessionBenchConfig, sessions: Sequence[ChatSession], rates: Sequence[float],
                      log: Callable[[str], None] = print) -> SessionBenchResult:
    """Warm up, then replay `sessions` at each rate (sessions/s) in increasing order."""
    if not sessions:
        raise ValueError("sessions: need at least one session")
    _warm_up(cfg, sessions)
    points = [_measure(cfg, sessions, rate, i, log) for i, rate in enumerate(sorted(rates))]
    curve = [(p.summary.rate, p.summary.attainment) for p in points]
    return SessionBenchResult(cfg, points, goodput_from_curve(curve, cfg.slo.attainment, cfg.gpus),
                              statistics.fmean(len(s.turns) for s in sessions))


def unloaded_session_records(endpoint: Endpoint, sessions: Sequence[ChatSession], num_sessions: int = 3,
                             timeout_s: float = 600.0) -> list[TurnRecord]:
    """Every turn of the first `num_sessions` sessions, one session at a time and no think time:
    the latency of each turn on an otherwise idle server (salted apart from any measured point)."""
    cfg = SessionLoadConfig(rate=1.0, think_time_s=0.0, timeout_s=timeout_s)
    return [r for s in sessions[:num_sessions]
            for r in asyncio.run(run_sessions(endpoint, [s.salted("Unloaded. ")], cfg))]


def _measure(cfg: SessionBenchConfig, sessions: Sequence[ChatSession], rate: float, index: int,
             log: Callable[[str], None]) -> SessionPoint:
    salted = [s.salted(f"[{index + 1}] ") for s in sessions]
    t0 = time.perf_counter()
    records = asyncio.run(run_sessions(cfg.endpoint, salted, replace(cfg.load, rate=rate)))
    summary = summarize(records, cfg.slo, rate, time.perf_counter() - t0)
    point = SessionPoint(records, summary, turn_stats(records), first_and_later(records))
    log(f"rate {rate:.3f} sessions/s: attainment {100 * summary.attainment:.1f}% over {len(records)} turns, "
        f"{summary.num_failed} failed, {summary.duration_s:.1f} s")
    return point


def _warm_up(cfg: SessionBenchConfig, sessions: Sequence[ChatSession]) -> None:
    if cfg.warmup <= 0:
        return
    first = [replace(s, turns=(replace(s.turns[0], output_len=min(4, s.turns[0].output_len)),)).salted("Warm-up. ")
             for s in sessions[:cfg.warmup]]
    records: list[RequestRecord] = []
    for s in first:
        records += asyncio.run(run_sessions(cfg.endpoint, [s], replace(cfg.load, rate=1.0)))
    if not any(r.ok for r in records):
        raise ValueError(f"endpoint {cfg.endpoint.url} failed the warm-up turn: {records[0].error}")


def save_sessions(result: SessionBenchResult, out_dir: str | Path, sessions: Sequence[ChatSession],
                  meta: dict) -> Path:
    """summary.json (goodput in sessions/s, each point with its per-turn stats), points.csv,
    requests.csv/jsonl (every turn, with its session and turn index) and lengths.jsonl: the sessions
    as a lengths file with their session fields (bench/session_trace.py), the planner's input."""
    from pdserve.bench.results import write_results
    from pdserve.bench.session_trace import session_trace

    cfg = result.config
    summary = {
        "label": cfg.label or Path(out_dir).name, "kind": "sessions",
        "endpoint": {"url": cfg.endpoint.base_url, "path": cfg.endpoint.path, "model": cfg.endpoint.model},
        "workload": {**meta, "num_sessions": len(sessions), "turns_per_session": result.turns_per_session,
                     "num_turns": sum(len(s.turns) for s in sessions)},
        "slo": asdict(cfg.slo), "gpus": cfg.gpus, "rate_unit": "sessions/s",
        "load": {k: v for k, v in asdict(cfg.load).items() if k != "rate"},
        "points": [p.to_dict() for p in result.points],
        "goodput": result.goodput.to_dict(),
    }
    return write_results(out_dir, summary, {p.summary.rate: p.records for p in result.points},
                         session_trace(sessions, cfg.load.think_time_s))


def _ms(value: float | None, width: int = 9) -> str:
    return f"{'-':>{width}}" if value is None else f"{value * 1e3:{width - 2}.1f}ms"


def _pct(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{100 * value:6.1f}%"
