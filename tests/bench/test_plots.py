"""Plots: the SLO-scale axis frames where curves move, and titles carry the SLOs they were drawn at."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.bench.metrics import describe_slo
from pdserve.bench.plots import plot_slo_scale, slo_scale_span
from pdserve.config import SLOConfig


def test_slo_scale_span_frames_the_moving_part_and_scale_one() -> None:
    flat_then_drop = [(s / 10, 1.0 if s >= 4 else 0.0) for s in range(50, 0, -1)]  # 100% down to 0.4x, then 0
    low, high = slo_scale_span([flat_then_drop])
    assert low == pytest.approx(0.2) and high == pytest.approx(1.1)  # 0.3..1.0, padded by 0.1; not 5.0
    gradual = [(s / 10, min(1.0, s / 30)) for s in range(50, 0, -1)]  # below 100% from 2.9x down
    assert slo_scale_span([flat_then_drop, gradual])[1] == pytest.approx(2.9 + 0.28)
    assert slo_scale_span([[(2.0, 1.0), (1.0, 1.0)]]) is None  # nothing moves: full range


def test_slo_scale_plot_is_written_with_its_slos_in_the_title(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.figure

    titles: list[str] = []
    original = matplotlib.figure.Figure.savefig

    def spy(self, *args, **kwargs):  # read the title the figure is saved with
        titles.extend(ax.get_title() for ax in self.axes)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    sub = describe_slo(SLOConfig(0.25, 0.05), scale=0.5)
    path = plot_slo_scale([("a", [(1.0, 1.0), (0.5, 0.2)])], 0.9, tmp_path / "s.png", subtitle=sub)
    assert path.stat().st_size > 1000
    assert titles == ["Attainment as the SLOs tighten\nTTFT <= 250 ms, TPOT <= 50 ms for 90% (SLO scale 0.5x)"]
