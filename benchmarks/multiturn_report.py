"""The tables of the multi-turn headline (benchmarks/multiturn.py), from what a run saved.

    python benchmarks/multiturn_report.py results/multiturn      # (re)writes report.md and attainment.png there
    python benchmarks/multiturn_report.py results/multiturn results/multiturn-2   # + both runs pooled

Reads summary.json (one entry per system run, keys a-e) and slo.json; systems not run yet are left
out, so a partial run reports what it has. Ratios respect goodput bounds (bench.goodput.Goodput.ratio_to).
With more run directories (repeats of the same trace at the same SLOs), it adds a table of goodput
from every run's turns pooled per system and rate, at the SLOs and at uniformly looser ones.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.goodput import Goodput, goodput_from_curve
from pdserve.bench.metrics import attainment
from pdserve.bench.results import read_results
from pdserve.config import SLOConfig

GPUS = 2.0
POOLED_SLO_SCALES = (1.0, 1.5, 2.0)
TIME_PARTS = ("queue_s", "prefill_s", "kv_exposed_s", "decode_s")  # pdserve_timings means; they sum to e2e
# pulled KV, the share of turns decode prefilled itself by the router's choice (conditional
# disaggregation) or recomputed after a failed pull, and the uncached tokens the decision saw
EXTRA_PARTS = ("transfer_s", "transfer_bytes", "pd_local", "pd_uncached_tokens", "kv_recomputed")


def write_report(out: str | Path, repeats: Sequence[str | Path] = ()) -> str:
    """Write out/report.md (with `repeats`: the pooled table too) and return it."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    slo = json.loads((out / "slo.json").read_text())
    systems = {k: summary[k] for k in "abcde" if k in summary}
    text = "\n\n".join([_slo(slo), _curves(systems), _goodput(systems), _targets(systems), _hits(systems),
                        _time(systems)] + ([_pooled([out, *map(Path, repeats)], systems, slo)] if repeats else [])) + "\n"
    (out / "report.md").write_text(text)
    _plot(systems, slo, out / "attainment.png")
    return text


def _plot(systems: dict, slo: dict, path: Path) -> None:
    from pdserve.bench.plots import plot_attainment

    series = [(_label(s), [(p["rate"] / GPUS, p["attainment"]) for p in s["points"]]) for s in systems.values()]
    plot_attainment(series, 0.9, path, xlabel="new sessions/s per core",
                    subtitle=f"multi-turn ShareGPT, TTFT <= {slo['ttft_scale'] * slo['unloaded_ttft_s']:.2f} s, "
                             f"TPOT <= {1e3 * slo['tpot_scale'] * slo['unloaded_tpot_s']:.0f} ms")


def _slo(slo: dict) -> str:
    return (f"SLOs: {slo['ttft_scale']:g}x unloaded TTFT {1e3 * slo['unloaded_ttft_s']:.0f} ms and "
            f"{slo['tpot_scale']:g}x unloaded TPOT {1e3 * slo['unloaded_tpot_s']:.1f} ms (medians over every turn "
            f"of {slo['num_sessions']} sessions one at a time, on {slo['measured_on']}) -> **TTFT <= "
            f"{slo['ttft_scale'] * slo['unloaded_ttft_s']:.2f} s, TPOT <= "
            f"{1e3 * slo['tpot_scale'] * slo['unloaded_tpot_s']:.1f} ms** for 90% of turns")


def _label(s: dict) -> str:
    return f"({s['key']}) {s['name']}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1e3 * v:.0f}"


def _curves(systems: dict) -> str:
    rates = sorted({p["rate"] for s in systems.values() for p in s["points"]})
    head = "| sessions/s | per core | " + " | ".join(_label(s) for s in systems.values()) + " |"
    rows = [head, "|" + "---|" * (2 + len(systems))]
    for r in rates:
        cells = []
        for s in systems.values():
            p = next((p for p in s["points"] if p["rate"] == r), None)
            cells.append("-" if p is None else f"{100 * p['attainment']:.1f}% ({_ms(p['first_and_later'][1]['ttft_p50_s'])}"
                         f" / {_ms(p['tpot_s']['p90'])})")
        rows.append(f"| {r:g} | {r / GPUS:g} | " + " | ".join(cells) + " |")
    return ("Joint attainment over every turn per session rate (turn-2+ TTFT p50 ms / TPOT p90 ms):\n\n"
            + "\n".join(rows))


def _goodput(systems: dict) -> str:
    rows = ["| system | goodput sessions/s per core | turns/s per core | ÷ (a) | host load (1-min avg, start/end) |",
            "|---|---|---|---|---|"]
    base = systems.get("a")
    for s in systems.values():
        g = Goodput(**s["goodput"])
        ratio = _ratio(g, Goodput(**base["goodput"])) if base and s is not base else "-"
        load = "/".join(f"{x:.1f}" for x in s.get("loadavg_1min", ()))
        rows.append(f"| {_label(s)} | {g.short(GPUS)} | {_scaled(g, s['turns_per_session'])} | {ratio} | {load} |")
    return "Per-core goodput at 90% joint attainment (linear interpolation on the curve above):\n\n" + "\n".join(rows)


def _scaled(g: Goodput, factor: float) -> str:
    """`g.short` per core, times `factor` (turns per session: turns/s)."""
    return g.short(GPUS / factor)


def _ratio(g: Goodput, base: Goodput) -> str:
    r = g.ratio_to(base, GPUS, GPUS)
    return "open (bounds only)" if r is None else f"{'' if r[0] == '=' else r[0]}{r[1]:.2f}"


def _targets(systems: dict) -> str:
    lines = ["Targets:"]
    a, best = systems.get("a"), [systems[k] for k in "bc" if k in systems]
    for k in "de":
        if k not in systems:
            continue
        g = Goodput(**systems[k]["goodput"])
        if a:
            lines.append(f"- ({k}) ÷ (a) = {_ratio(g, Goodput(**a['goodput']))} (target >= 2)")
        for b in best:
            lines.append(f"- ({k}) ÷ ({b['key']}) = {_ratio(g, Goodput(**b['goodput']))} (target >= 1.3 over the best "
                         f"of (b), (c))")
    if a and "e" in systems:
        for pa, pe in zip(a["points"], systems["e"]["points"]):
            ta, te = pa["first_and_later"][1]["ttft_p50_s"], pe["first_and_later"][1]["ttft_p50_s"]
            if ta and te is not None:
                lines.append(f"- turn-2+ TTFT p50 at {pa['rate']:g} sessions/s: (e) {_ms(te)} ms ÷ (a) {_ms(ta)} ms "
                             f"= {te / ta:.2f} (target <= 0.3)")
    return "\n".join(lines)


def _hits(systems: dict) -> str:
    rows = ["| system | sessions/s | turn 1 cached | turn 2+ cached | turn 2+ pull skipped | "
            "turn 1 TTFT p50 ms | turn 2+ TTFT p50 / p90 ms |", "|---|---|---|---|---|---|---|"]
    for s in systems.values():
        for p in s["points"]:
            t1, later = p["first_and_later"]
            rows.append(f"| {_label(s)} | {p['rate']:g} | {_pct(t1['cached_fraction'])} | "
                        f"{_pct(later['cached_fraction'])} | {_pct(later['pull_skipped_fraction'])} | "
                        f"{_ms(t1['ttft_p50_s'])} | {_ms(later['ttft_p50_s'])} / {_ms(later['ttft_p90_s'])} |")
    return ("Prefix hits (share of prompt tokens, server-reported `cached_tokens` / `pull_skipped_tokens` over "
            "`usage.prompt_tokens`) and TTFT by turn:\n\n" + "\n".join(rows))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _time(systems: dict) -> str:
    extra = [k for k in EXTRA_PARTS if any(k in p["server_timings_mean"] for s in systems.values() for p in s["points"])]
    rows = ["| system | sessions/s | " + " | ".join(k.removesuffix("_s") + " ms" for k in TIME_PARTS) + " | "
            + " | ".join(extra) + " |", "|---|---|" + "---|" * (len(TIME_PARTS) + len(extra))]
    for s in systems.values():
        for p in s["points"]:
            t = p["server_timings_mean"]
            rows.append(f"| {_label(s)} | {p['rate']:g} | " + " | ".join(_ms(t.get(k, 0.0)) for k in TIME_PARTS)
                        + " | " + " | ".join(_fmt(k, t.get(k, 0.0)) for k in extra) + " |")
    return ("Where the time went (pdserve's per-turn breakdown, means over completed turns; queue + prefill + "
            "exposed KV transfer + decode = end-to-end; flags are the share of turns that raised them):\n\n"
            + "\n".join(rows))


def _fmt(key: str, v: float) -> str:
    if key.endswith("_s"):
        return f"{1e3 * v:.0f} ms"
    return f"{v / 1e6:.2f} MB" if key.endswith("bytes") else f"{v:.2f}"


def _pooled(dirs: list[Path], systems: dict, slo: dict) -> str:
    base = SLOConfig(slo["ttft_scale"] * slo["unloaded_ttft_s"], slo["tpot_scale"] * slo["unloaded_tpot_s"], 0.9)
    head = "| system | " + " | ".join(f"{x:g}x SLOs" for x in POOLED_SLO_SCALES) + " |"
    rows = [head, "|---|" + "---|" * len(POOLED_SLO_SCALES)]
    for s in systems.values():
        by_rate: dict[float, list] = {}
        for d in dirs:
            if (d / s["name"] / "summary.json").exists():
                for rate, records in read_results(d / s["name"]).records.items():
                    by_rate.setdefault(rate, []).extend(records)
        cells = []
        for scale in POOLED_SLO_SCALES:
            curve = [(rate, attainment(records, base.scaled(scale))) for rate, records in by_rate.items()]
            cells.append(goodput_from_curve(curve, 0.9, GPUS).short(GPUS))
        rows.append(f"| {_label(s)} | " + " | ".join(cells) + " |")
    return (f"Per-core goodput (sessions/s) with the turns of {len(dirs)} runs of the same trace pooled per system "
            "and rate, at the SLOs and uniformly looser ones:\n\n" + "\n".join(rows))


if __name__ == "__main__":
    print(write_report(sys.argv[1] if len(sys.argv) > 1 else "results/multiturn", sys.argv[2:]))
