"""`pdserve bench compare`: overlay several results directories (one per system) and rank them by
per-GPU goodput. Attainment and goodput are recomputed from the per-request records, so the
systems can be compared at another SLO than the one they ran with (`slo`, e.g. a scaled one).
Latency CDFs and SLO-scale curves compare the systems at one per-GPU rate: for each system, the
measured point nearest to it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from pdserve.bench import plots
from pdserve.bench.goodput import Goodput, goodput_from_curve
from pdserve.bench.metrics import attainment, describe_slo, min_slo_scale
from pdserve.bench.results import RunData, read_results
from pdserve.bench.runner import cdf_series, slo_curve
from pdserve.bench.units import fmt_duration
from pdserve.config import SLOConfig


def compare(dirs: Sequence[str | Path], out_dir: str | Path, at_rate: float | None = None,
            slo: SLOConfig | None = None, slo_scale: float = 1.0) -> str:
    """Write compare.json and three overlay plots into `out_dir`; return the comparison table.
    `slo` replaces every run's own SLO when given; `slo_scale` is what it was scaled by (for titles)."""
    runs = [read_results(d) for d in dirs]
    slos = [slo or SLOConfig(**r.summary["slo"]) for r in runs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = [_curve(r, s) for r, s in zip(runs, slos)]
    target = slos[0].attainment
    sub = describe_slo(slos[0], slo_scale) if len(set(slos)) == 1 else f"each run's own SLOs (scale {slo_scale:g}x)"
    plots.plot_attainment([(r.label, c) for r, c in zip(runs, curves)], target, out / "attainment.png", subtitle=sub)
    if at_rate is None:
        at_rate = min(max((x for x, _ in c), default=0.0) for c in curves)
    chosen = [_nearest_rate(r, at_rate) for r in runs]
    series = [(r.label, r.records.get(rate, []) if rate is not None else []) for r, rate in zip(runs, chosen)]
    legends = [f"{r.label} @ {rate / r.summary['gpus']:.3g} req/s/GPU" if rate is not None else f"{r.label} (no data)"
               for r, rate in zip(runs, chosen)]
    plots.plot_latency_cdfs(cdf_series([(lg, rec) for lg, (_, rec) in zip(legends, series)]), slos[0].ttft_s,
                            slos[0].tpot_s, out / "latency_cdf.png", subtitle=sub)
    plots.plot_slo_scale([(lg, slo_curve(records, s)) for lg, (_, records), s in zip(legends, series, slos)],
                         target, out / "slo_scale.png", subtitle=sub)
    rows = []
    for r, s, c, rate, (_, records) in zip(runs, slos, curves, chosen, series):
        gpus = r.summary["gpus"]
        g = goodput_from_curve([(x * gpus, a) for x, a in c], s.attainment, gpus)
        rows.append({"label": r.label, "gpus": gpus, "slo": asdict(s), "goodput": g.to_dict(),
                     "curve_per_gpu": c, "rate_for_curves": rate,
                     "min_slo_scale": min_slo_scale(records, s) if records else None})
    base = Goodput(**rows[0]["goodput"])
    for row in rows:  # per-GPU goodput relative to the first system's, bounds respected
        ratio = Goodput(**row["goodput"]).ratio_to(base, row["gpus"], rows[0]["gpus"])
        row["vs_first"] = None if ratio is None else {"relation": ratio[0], "value": ratio[1]}
    (out / "compare.json").write_text(json.dumps({"at_rate_per_gpu": at_rate, "systems": rows}, indent=2))
    return _table(rows, at_rate)


def _curve(run: RunData, slo: SLOConfig) -> list[tuple[float, float]]:
    """(per-GPU rate, joint attainment) per measured rate, from the records when present."""
    gpus = run.summary["gpus"]
    if run.records:
        return [(rate / gpus, attainment(records, slo)) for rate, records in sorted(run.records.items())]
    return [(p["rate"] / gpus, p["attainment"]) for p in run.summary["points"] if p["rate"] is not None]


def _nearest_rate(run: RunData, per_gpu_rate: float) -> float | None:
    gpus = run.summary["gpus"]
    return min(run.records, key=lambda rate: abs(rate / gpus - per_gpu_rate), default=None)


def _table(rows: list[dict], at_rate: float) -> str:
    lines = [f"{'system':<24} {'GPUs':>5} {'goodput':>10} {'/GPU':>8} {'vs first':>8} {'min SLO scale':>14}"]
    for row in rows:
        g = Goodput(**row["goodput"])
        vs = row["vs_first"]
        ratio = "n/a" if vs is None else ("" if vs["relation"] == "=" else vs["relation"]) + f"{vs['value']:.2f}x"
        scale = "-" if row["min_slo_scale"] is None else f"{row['min_slo_scale']:.2f}"
        lines.append(f"{row['label']:<24} {row['gpus']:>5g} {g.short():>10} "
                     f"{g.short(row['gpus']):>8} {ratio:>8} {scale:>14}")
    slo = rows[0]["slo"]
    lines.append(f"SLO: TTFT <= {fmt_duration(slo['ttft_s'])}, TPOT <= {fmt_duration(slo['tpot_s'])} for "
                 f"{100 * slo['attainment']:g}% of requests; curves and min SLO scale at the point nearest "
                 f"{at_rate:.3f} req/s/GPU")
    if any(Goodput(**row["goodput"]).bracket != "interpolated" for row in rows):
        lines.append(">=X: met the SLOs at every rate measured (goodput at least X); <X: met them at none "
                     "(below the lowest rate X); ratios against a bound are bounds, n/a when unknown")
    return "\n".join(lines)
