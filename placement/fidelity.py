"""Simulated vs measured joint SLO attainment of the same requests, per system and rate: the
simulator-fidelity comparison (benchmarks/fidelity.py parses arguments and prints it).

For every bench results directory (one per deployment, as benchmarks/headline.py writes them) and
every rate in it, the exact recorded trace is replayed through the simulator twice: with the bare
profile and with the system's calibrated model (calibrate.py), optionally with every step scaled
by the host's speed at that point (host_speed.py), and compared with the measured attainment.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.metrics import attainment
from pdserve.bench.summary import percentile_stats
from pdserve.bench.results import RunData, read_results
from pdserve.config import SLOConfig
from pdserve.placement.calibrate import Setup, jitter_range, simulate_records, system_kind
from pdserve.placement.latency import PhaseProfile
from pdserve.placement.profile_file import load_profile


def p90(xs: Sequence[float]) -> float:
    """The same percentile `pdserve bench` reports (linear interpolation), for both columns."""
    return percentile_stats(list(xs))["p90"] or float("nan") if xs else float("nan")


Model = tuple[PhaseProfile, Setup]


def compare(runs: dict[str, RunData], base: Model, calibrated: dict[str, Model], jitter_s: float = 0.0,
            jitter_runs: int = 20, sensitivity: float = 0.0,
            speeds: dict[str, dict[float, float]] | None = None) -> list[dict]:
    """Per system and rate: the bare profile (`base`) and the system's calibrated model, every step
    of it `speeds[system][rate]`× as long when given (`speed_factors`); with `jitter_s` the
    calibrated model's attainment range under that much send-time jitter, with `sensitivity` its
    attainment with every step (1 ∓ sensitivity)× as long."""
    rows = []
    for label, run in runs.items():
        kind = system_kind(label)
        profile, (cal_base, cal_setup) = base[0], calibrated[label]
        slo = SLOConfig(run.summary["slo"]["ttft_s"], run.summary["slo"]["tpot_s"])
        for rate in sorted(run.records):
            records = run.records[rate]
            speed = speeds[label][rate] if speeds else None
            cal_profile = cal_base.scaled(speed) if speed else cal_base
            olens = [r.output_len for r in records]
            raw = simulate_records(kind, records, profile, base[1])
            cal = simulate_records(kind, records, cal_profile, cal_setup)
            measured = attainment(records, slo)
            simulated = cal.attainment(slo.ttft_s, slo.tpot_s)
            rows.append(dict(
                system=label, rate=rate, n=len(records), failed=sum(not r.ok for r in records), measured=measured,
                sim_profile=raw.attainment(slo.ttft_s, slo.tpot_s), simulated=simulated, speed=speed,
                diff=abs(simulated - measured),
                ttft_p90=(p90([r.ttft_s for r in records if r.ok and r.ttft_s is not None]), p90(cal.ttft_s)),
                tpot_p90=(p90([t for r in records if (t := r.tpot_s) is not None]),
                          p90([t for t, n in zip(cal.tpot_s, olens) if n >= 2])),
                transfer_ms=_mean([r.server_timings.get("transfer_s") for r in records]),
                path_ms=_mean([r.ttft_s - r.server_timings["ttft_s"] for r in records
                               if r.ok and r.ttft_s is not None and "ttft_s" in r.server_timings]),
                jitter=jitter_range(kind, records, cal_profile, cal_setup, slo, jitter_s, jitter_runs) if jitter_s else None,
                sensitivity=tuple(simulate_records(kind, records, cal_profile.scaled(k), cal_setup)
                                  .attainment(slo.ttft_s, slo.tpot_s)
                                  for k in (1 - sensitivity, 1 + sensitivity)) if sensitivity else None,
            ))
    return rows


def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return 1e3 * statistics.fmean(xs) if xs else None


def markdown(rows: list[dict], notes: Sequence[str], jitter_ms: float = 0.0, sensitivity: float = 0.0) -> str:
    jit = bool(rows) and rows[0].get("jitter") is not None
    sens = bool(rows) and rows[0].get("sensitivity") is not None
    spd = bool(rows) and rows[0].get("speed") is not None
    out = ["| system | rate (req/s) | requests | failed | measured | simulated (profile only) | "
           + ("host speed | " if spd else "") + "simulated | abs diff (points) "
           + (f"| simulated, ±{jitter_ms:g} ms send jitter (min–max) " if jit else "")
           + (f"| simulated, steps ×{1 - sensitivity:g} / ×{1 + sensitivity:g} " if sens else "")
           + "| TTFT p90 meas / sim (ms) | TPOT p90 meas / sim (ms) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if spd else "") + ("---:|" if jit else "") + ("---:|" if sens else "") + "---:|---:|"]
    for r in rows:
        out.append(f"| {r['system']} | {r['rate']:g} | {r['n']} | {r['failed']} | {100 * r['measured']:.1f}% | "
                   f"{100 * r['sim_profile']:.1f}% | " + (f"{r['speed']:.3f}× | " if spd else "")
                   + f"{100 * r['simulated']:.1f}% | {100 * r['diff']:.1f} | "
                   + (f"{100 * r['jitter'][0]:.1f}–{100 * r['jitter'][1]:.1f}% | " if jit else "")
                   + (f"{100 * r['sensitivity'][0]:.1f}% / {100 * r['sensitivity'][1]:.1f}% | " if sens else "")
                   + f"{_ms(r['ttft_p90'][0])} / {_ms(r['ttft_p90'][1])} | {_ms(r['tpot_p90'][0])} / {_ms(r['tpot_p90'][1])} |")
    worst = max((r["diff"] for r in rows), default=float("nan"))
    out.append("")
    out.append(f"max |simulated − measured| = {100 * worst:.1f} points over {len(rows)} points (target: ≤ 5); "
               f"mean {100 * statistics.fmean(r['diff'] for r in rows) if rows else float('nan'):.1f}; "
               f"within 5 points at {sum(r['diff'] <= 0.05 + 1e-9 for r in rows)}")
    if jit:
        inside = sum(r["jitter"][0] - 1e-9 <= r["measured"] <= r["jitter"][1] + 1e-9 for r in rows)
        out.append(f"measured inside the simulated jitter range at {inside} of {len(rows)} points; "
                   f"widest range {100 * max(r['jitter'][1] - r['jitter'][0] for r in rows):.1f} points")
    for label in dict.fromkeys(r["system"] for r in rows):
        sub = [r for r in rows if r["system"] == label]
        out.append(f"- {label}: max |diff| {100 * max(r['diff'] for r in sub):.1f} points" + "".join(
            f"; measured mean {name} {v:.0f} ms" for name, key in (("KV transfer", "transfer_ms"),
                                                                     ("client-path TTFT", "path_ms"))
            if (v := _mean([r[key] / 1e3 if r[key] is not None else None for r in sub])) is not None))
    out.extend(f"- {n}" for n in notes)
    return "\n".join(out) + "\n"


def _ms(x: float) -> str:
    return "-" if x != x else ("inf" if x == float("inf") else f"{x * 1e3:.0f}")


def load_runs(paths: Sequence[str]) -> dict[str, RunData]:
    """Results directories, or a directory holding them (e.g. results/headline)."""
    runs: dict[str, RunData] = {}
    for p in map(Path, paths):
        dirs = [p] if (p / "requests.jsonl").is_file() else sorted(d for d in p.iterdir() if (d / "requests.jsonl").is_file())
        for d in dirs:
            run = read_results(d)
            runs[run.label] = run
    if not runs:
        raise ValueError(f"no bench results directories in {', '.join(paths)}")
    return runs


def pick_profile(path: str, model: str | None) -> PhaseProfile:
    table = load_profile(path).table
    key = model or next((k for k in table if "smollm2" in k.lower()), None) or next(iter(table))
    if key not in table or 1 not in table[key]:
        raise ValueError(f"{path}: no tp=1 entry for {key!r} (models: {', '.join(table)})")
    return table[key][1]
