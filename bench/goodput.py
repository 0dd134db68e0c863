"""Goodput: the highest request rate at which the target share of requests meets both SLOs.

Read off the measured attainment-vs-rate curve as DistServe does: walk the points by increasing
rate, find the first one below the target, and interpolate linearly between it and the point
before it. When no measured rate misses the target, goodput is at least the highest rate
measured ("above_range"); when even the lowest misses, it is below the range measured and is
reported as 0 ("below_range"; `lowest_rate` keeps the bound). Per-GPU goodput divides by the
deployment's GPU count. Comparing two goodputs respects the bounds (`ratio_to`).
"""

from __future__ import annotations

import math
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
    lowest_rate: float = 0.0  # the lowest rate measured: with "below_range", goodput is under it

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.bracket == "below_range":
            return (f"< {self.lowest_rate:.3f} req/s, the lowest rate measured "
                    f"(counted as 0; measure lower rates or loosen the SLOs)")
        if self.bracket == "no_data":
            return "no data"
        prefix = ">= " if self.bracket == "above_range" else ""
        return f"{prefix}{self.rate:.3f} req/s ({prefix}{self.per_gpu:.3f} req/s/GPU)"

    def short(self, gpus: float | None = None) -> str:
        """`1.234`, `>=2.000` or `<0.500` req/s (per GPU when `gpus` is given): the value with its
        bound, for tables."""
        n = gpus or 1.0
        if self.bracket == "below_range":
            return f"<{self.lowest_rate / n:.3f}"
        if self.bracket == "no_data":
            return "-"
        return (">=" if self.bracket == "above_range" else "") + f"{self.rate / n:.3f}"

    def ratio_to(self, base: Goodput, gpus: float, base_gpus: float) -> tuple[str, float] | None:
        """Per-GPU goodput over `base`'s as (relation, value): "=" when both are interpolated; ">=",
        "<=", ">" or "<" when a bound is involved; None when the bounds leave it open (both
        lower bounds, both upper bounds, no data or a zero)."""
        def interval(g: Goodput, n: float) -> tuple[float, float] | None:  # per-GPU [lo, hi]
            return {"interpolated": (g.rate / n, g.rate / n), "above_range": (g.rate / n, math.inf),
                    "below_range": (0.0, g.lowest_rate / n)}.get(g.bracket)

        a, b = interval(self, gpus), interval(base, base_gpus)
        if a is None or b is None:
            return None
        lo = a[0] / b[1] if b[1] not in (0.0, math.inf) else (0.0 if b[1] == math.inf else None)
        hi = a[1] / b[0] if b[0] > 0 else None
        if lo is not None and hi is not None and lo == hi:
            return ("=", lo)
        strict = "below_range" in (self.bracket, base.bracket)
        if lo and (hi is None or hi == math.inf):
            return (">" if strict else ">=", lo)
        if hi is not None and hi != math.inf and not lo:
            return ("<" if strict else "<=", hi)
        return None


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
                return Goodput(0.0, 0.0, "below_range", target, lowest_rate=rate)
            r0, a0 = prev
            g = r0 + (a0 - target) * (rate - r0) / (a0 - att)
            return Goodput(g, g / gpus, "interpolated", target, lowest_rate=curve[0][0])
        prev = (rate, att)
    return Goodput(curve[-1][0], curve[-1][0] / gpus, "above_range", target, lowest_rate=curve[0][0])


def slo_scale_curve(needs: Sequence[float], scales: Sequence[float]) -> list[tuple[float, float]]:
    """(scale, attainment) at each scale, from the per-request scales needed
    (metrics.slo_scale_needed; inf for failed requests)."""
    n = len(needs)
    return [(s, sum(x <= s + _EPS for x in needs) / n if n else 0.0) for s in scales]
