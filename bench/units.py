"""Durations as people write and read them: `500ms`, `1.5s` in; `832 µs`, `83.2 ms`, `1.25 s` out.

Seconds are the unit everywhere inside (SLO, records, summaries); these two functions are the only
place text meets them. (No library: humanize spells units out, pint would be a 1 MB dependency for
two suffixes.)
"""

from __future__ import annotations

import argparse
import math


def parse_duration(text: str) -> float:
    """Seconds from `250ms`, `1s`, `1.5 s`, `300us` or a plain number of seconds."""
    t = text.strip().lower().replace(" ", "")
    for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("s", 1.0)):
        if t.endswith(suffix):
            t, factor = t[: -len(suffix)], scale
            break
    else:
        factor = 1.0
    try:
        value = float(t) * factor
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (try 1s or 250ms)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a duration: {text!r} (must be finite and >= 0)")
    return value


def fmt_duration(seconds: float | None) -> str:
    """Three significant digits in the unit that keeps the number between 1 and 1000."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale or unit == "µs":
            value = seconds / scale
            return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def duration_arg(text: str) -> float:
    """`parse_duration` as an argparse `type=`: a bad value is a usage error, not a traceback."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
