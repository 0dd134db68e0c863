"""Matplotlib figures for results: attainment vs per-GPU rate, latency CDFs, SLO-scale curves.

Figures are built on `matplotlib.figure.Figure` and saved through the Agg canvas, so no pyplot
global state and no display are involved. Each function draws one curve per labelled series, each
with its own hollow marker and dash so that overlapping series stay visible; `subtitle` (the SLOs
and their scale) goes under every title, so plots made at different SLOs cannot be mistaken.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pdserve.bench.units import fmt_duration

Series = tuple[str, Sequence[tuple[float, float]]]  # (label, [(x, y), ...])
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", "-.", ":")


def _style(i: int) -> dict:
    return {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": _DASHES[i % len(_DASHES)],
            "markerfacecolor": "none", "markersize": 7, "markeredgewidth": 1.5, "alpha": 0.9}


def plot_attainment(series: Sequence[Series], target: float, path: str | Path,
                    xlabel: str = "rate per GPU (req/s/GPU)", subtitle: str = "") -> Path:
    fig, ax = _figure()
    for i, (label, points) in enumerate(series):
        xs, ys = zip(*sorted(points)) if points else ((), ())
        ax.plot(xs, [100 * y for y in ys], label=label, **_style(i))
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
    ax.set(xlabel=xlabel, ylabel="SLO attainment (%)", ylim=(-2, 102),
           title=_title("Joint TTFT+TPOT SLO attainment", subtitle))
    return _save(fig, ax, path)


def plot_latency_cdfs(series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
                      slo_ttft_s: float, slo_tpot_s: float, path: str | Path, subtitle: str = "") -> Path:
    """series: (label, TTFTs, TPOTs) in seconds, each of completed requests; label each series by
    its per-GPU rate, as the attainment plot's axis is."""
    fig = Figure(figsize=(10, 4.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, idx, slo, name in ((axes[0], 1, slo_ttft_s, "TTFT"), (axes[1], 2, slo_tpot_s, "TPOT")):
        for i, s in enumerate(series):
            values = np.sort(np.asarray(s[idx], dtype=float) * 1e3)
            if len(values):
                style = _style(i) | {"marker": None}
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=s[0], **style)
        ax.axvline(slo * 1e3, color="grey", linestyle="--", linewidth=1, label=f"SLO {fmt_duration(slo)}")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if subtitle:
        fig.suptitle(subtitle, fontsize=9)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_slo_scale(series: Sequence[Series], target: float, path: str | Path, subtitle: str = "") -> Path:
    """series: (label, [(scale, attainment), ...]); the x range is cut to where some curve moves."""
    fig, ax = _figure()
    for i, (label, points) in enumerate(series):
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, [100 * y for y in ys], label=label, **_style(i) | {"markersize": 4})
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
    span = slo_scale_span([p for _, p in series])
    if span is not None:
        ax.set_xlim(*span)
    ax.invert_xaxis()  # tighter SLOs to the right, as in DistServe's figures
    ax.set(xlabel="SLO scale (x the TTFT and TPOT SLOs)", ylabel="SLO attainment (%)", ylim=(-2, 102),
           title=_title("Attainment as the SLOs tighten", subtitle))
    return _save(fig, ax, path)


def slo_scale_span(curves: Sequence[Sequence[tuple[float, float]]]) -> tuple[float, float] | None:
    """(low, high) scales framing where the curves change, scale 1 (the SLOs themselves) always in
    view: from the smallest scale at which some curve is above 0% to the largest at which some is
    below 100%. None when no curve changes (the full range says as much)."""
    below_full = [x for c in curves for x, y in c if y < 1]
    above_zero = [x for c in curves for x, y in c if y > 0]
    if not below_full or not above_zero:
        return None
    ends = (max(below_full), min(above_zero), 1.0)
    low, high = min(ends), max(ends)
    pad = max(0.1, 0.1 * (high - low))
    return max(0.0, low - pad), high + pad


def _title(title: str, subtitle: str) -> str:
    return f"{title}\n{subtitle}" if subtitle else title


def _figure():
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, ax, path: str | Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return Path(path)
