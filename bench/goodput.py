"""Goodput: the highest request rate at which the target share of requests meets both SLOs.

Read off the measured attainment-vs-rate curve as DistServe does: walk the points by increasing
rate, find the first one below the target, and interpolate linearly between it and the point
before it. When no measured rate misses the target, goodput is at least the highest rate
measured ("above_range"); when even the lowest misses, it is below the range measured and is
reported as 0 ("below_range"). Per-GPU goodput divides by the deployment's GPU count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

_EPS = 1e-9

Bracket = Literal["interpolated", "above_range", "below_range", "no_data"]


@dataclass(frozen=True)
class Goodput:
    rate: float  # req/s for the whole deployment
    per_gpu: float
    bracket: Bracket
    target: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        prefix = {"interpolated": "", "above_range": ">= ", "below_range": "< lowest rate, ", "no_data": ""}
        return f"{prefix[self.bracket]}{self.rate:.3f} req/s ({self.per_gpu:.3f} req/s/GPU)"


def goodput_from_curve(points: Sequence[tuple[float, float]], target: float, gpus: float = 1.0) -> Goodput:
    """`points` are (rate, attainment) pairs in any order; the last of equal rates wins."""
    if gpus <= 0:
        raise ValueError(f"gpus: must be > 0, got {gpus}")
    curve = sorted(dict(points).items())
    if not curve:
        return Goodput(0.0, 0.0, "no_data", target)
    prev: tuple[float, float] | None = None
    for rate, att in curve:
        if att < target - _EPS:
            if prev is None:
                return Goodput(0.0, 0.0, "below_range", target)
            r0, a0 = prev
            g = r0 + (a0 - target) * (rate - r0) / (a0 - att)
            return Goodput(g, g / gpus, "interpolated", target)
        prev = (rate, att)
    return Goodput(curve[-1][0], curve[-1][0] / gpus, "above_range", target)


def slo_scale_curve(needs: Sequence[float], scales: Sequence[float]) -> list[tuple[float, float]]:
    """(scale, attainment) at each scale, from the per-request scales needed
    (metrics.slo_scale_needed; inf for failed requests)."""
    n = len(needs)
    return [(s, sum(x <= s + _EPS for x in needs) / n if n else 0.0) for s in scales]
