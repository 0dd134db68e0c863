"""How fast a shared host ran: measured ÷ modelled engine-step time, for the simulator-fidelity
calibration (calibrate.py). This machine's speed moves by 5-10% within minutes, and a step that
runs beside another busy engine of the host is slower than one alone; both show in the steps'
durations against the latency model (`steps.step_time`), never in the requests' latencies.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.results import RunData
from pdserve.placement.latency import PhaseProfile
from pdserve.placement.steps import StepLogs, overlapped, step_time, steps_by
from pdserve.types import StepRecord


def corun_slowdown(logs: StepLogs, profile: PhaseProfile) -> tuple[float, float]:
    """Mean measured ÷ modelled step time of the steps that ran alone on the host (< 10% of the
    step overlapped by another engine's steps) and of those that ran beside another engine
    (> 90%): what sharing the host costs, which a profile fitted across both averages away.
    NaN for a kind with no steps."""
    alone, beside = [], []
    for s, overlap in overlapped(logs):
        ratio = s.duration_s / step_time(profile, s)
        if overlap < 0.1:
            alone.append(ratio)
        elif overlap > 0.9:
            beside.append(ratio)
    return (statistics.fmean(alone) if alone else float("nan"), statistics.fmean(beside) if beside else float("nan"))


def own_speed(logs: StepLogs, profile: PhaseProfile, host_slowdown: float) -> float:
    """Measured ÷ modelled time of these steps in total, a step modelled (1 + host_slowdown)× as
    long when other engines' steps overlapped more than half of it."""
    measured = modelled = 0.0
    for s, overlap in overlapped(logs):
        measured += s.duration_s
        modelled += step_time(profile, s) * (1 + host_slowdown if overlap > 0.5 else 1.0)
    return measured / modelled


def host_speed(steps: Sequence[StepRecord], profile: PhaseProfile) -> float:
    """Measured ÷ modelled time of these steps, in total."""
    return sum(s.duration_s for s in steps) / sum(step_time(profile, s) for s in steps)


def read_probes(run_dir: Path) -> list[list[StepRecord]]:
    """probes.jsonl (benchmarks/headline.py) by probe number: probe i ran just before the i-th rate
    point, probe i + 1 just after it."""
    path = run_dir / "probes.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no probes.jsonl (run benchmarks/headline.py without --no-probe)")
    probes = steps_by(path, "probe")
    return [[s for log in probes.get(i, {}).values() for s in log] for i in range(int(max(probes, default=-1)) + 1)]


def speed_factors(run: RunData, calibration_dir: Path, profile: PhaseProfile) -> dict[float, float]:
    """Per rate point of `run`: how many times slower the host ran around it than during the
    calibration run — the probes just before and just after the point against the calibration
    run's probes (the same requests, one at a time), all timed by the calibration's profile."""
    reference = host_speed([s for p in read_probes(calibration_dir) for s in p], profile)
    probes, rates = read_probes(run.path), sorted(run.records)
    if len(probes) != len(rates) + 1 or not all(probes):
        raise ValueError(f"{run.path}: {len(probes)} probes for {len(rates)} rate points "
                         "(want one before each and one after the last)")
    return {rate: host_speed(probes[i] + probes[i + 1], profile) / reference for i, rate in enumerate(rates)}


def own_speed_factors(run: RunData, profile: PhaseProfile, host_slowdown: float) -> dict[float, float]:
    """Per rate point of `run`: its own engine steps (steps.jsonl) measured ÷ modelled
    (`own_speed`): how fast the host ran during the point. It reads the compared run's step
    durations (not its latencies), so the simulation no longer predicts the host's speed, only
    what the deployment makes of it: scheduling, batching, queueing, transfer."""
    points = steps_by(run.path / "steps.jsonl", "rate")
    return {rate: own_speed(points[rate], profile, host_slowdown) for rate in sorted(run.records)}
