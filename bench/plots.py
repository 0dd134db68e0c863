"""Matplotlib figures for results: attainment vs per-GPU rate, latency CDFs, SLO-scale curves.

Figures are built on `matplotlib.figure.Figure` and saved through the Agg canvas, so no pyplot
global state and no display are involved. Each function draws one curve per labelled series.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = tuple[str, Sequence[tuple[float, float]]]  # (label, [(x, y), ...])


def plot_attainment(series: Sequence[Series], target: float, path: str | Path,
                    xlabel: str = "rate per GPU (req/s/GPU)") -> Path:
    fig, ax = _figure()
    for label, points in series:
        xs, ys = zip(*sorted(points)) if points else ((), ())
        ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
    ax.set(xlabel=xlabel, ylabel="SLO attainment (%)", ylim=(-2, 102), title="Joint TTFT+TPOT SLO attainment")
    return _save(fig, ax, path)


def plot_latency_cdfs(series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
                      slo_ttft_s: float, slo_tpot_s: float, path: str | Path) -> Path:
    """series: (label, TTFTs, TPOTs) in seconds, each of completed requests."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, idx, slo, name in ((axes[0], 1, slo_ttft_s, "TTFT"), (axes[1], 2, slo_tpot_s, "TPOT")):
        for s in series:
            values = np.sort(np.asarray(s[idx], dtype=float) * 1e3)
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=s[0])
        ax.axvline(slo * 1e3, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo * 1e3:g} ms")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_slo_scale(series: Sequence[Series], target: float, path: str | Path) -> Path:
    fig, ax = _figure()
    for label, points in series:
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, [100 * y for y in ys], label=label)
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
    ax.invert_xaxis()  # tighter SLOs to the right, as in DistServe's figures
    ax.set(xlabel="SLO scale (x the TTFT and TPOT SLOs)", ylabel="SLO attainment (%)", ylim=(-2, 102),
           title="Attainment as the SLOs tighten")
    return _save(fig, ax, path)


def _figure():
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, ax, path: str | Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return Path(path)
