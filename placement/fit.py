"""Fitting latency coefficients from measurements: least squares on relative error (each row of
the design matrix and its target divided by the measured time), so short and long batches weigh
the same, as DistServe fits its profiles. Pure numpy.

Besides DistServe's linear coefficients, a profile gets the measured curves (latency.py): the
prefill time at each measured Σl and the decode time at each measured batch size, with the
attention term (c·Σl², b·Σctx) fitted jointly across all samples and taken out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.placement.latency import Coeffs, Curve, PhaseProfile


@dataclass(frozen=True)
class PrefillSample:
    prompt_lens: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    context_lens: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class FitReport:
    max_rel_error: float
    mean_rel_error: float


def fit_relative(x1: Sequence[float], x2: Sequence[float], y: Sequence[float]) -> tuple[Coeffs, FitReport]:
    """Fit y ≈ a + b·x1 + c·x2 minimising Σ((pred − y)/y)²."""
    y_arr = np.asarray(y, dtype=np.float64)
    if len(y_arr) < 3 or np.any(y_arr <= 0):
        raise ValueError(f"fit: need >= 3 positive measurements, got {len(y_arr)}")
    design = np.stack([np.ones_like(y_arr), np.asarray(x1, np.float64), np.asarray(x2, np.float64)], axis=1)
    coef, *_ = np.linalg.lstsq(design / y_arr[:, None], np.ones_like(y_arr), rcond=None)
    rel = np.abs(design @ coef / y_arr - 1.0)
    return Coeffs(*(float(v) for v in coef)), FitReport(float(rel.max()), float(rel.mean()))


def fit_curve(keys: Sequence[float], x: Sequence[float], y: Sequence[float]) -> tuple[Curve, FitReport] | None:
    """Fit y ≈ f(key) + s·x with one free value of f per distinct key and one shared slope s,
    minimising relative error; None when there are fewer than 2 keys or s is not identifiable
    (no key measured at two different x)."""
    xs = sorted(set(keys))
    col = {k: i for i, k in enumerate(xs)}
    if len(xs) < 2 or not any(len({xv for kv, xv in zip(keys, x) if kv == k}) > 1 for k in xs):
        return None
    y_arr = np.asarray(y, dtype=np.float64)
    design = np.zeros((len(y_arr), len(xs) + 1))
    for row, (k, xv) in enumerate(zip(keys, x)):
        design[row, col[k]] = 1.0
        design[row, -1] = xv
    coef, *_ = np.linalg.lstsq(design / y_arr[:, None], np.ones_like(y_arr), rcond=None)
    rel = np.abs(design @ coef / y_arr - 1.0)
    curve = Curve(tuple(float(k) for k in xs), tuple(float(v) for v in coef[:-1]), float(coef[-1]))
    return curve, FitReport(float(rel.max()), float(rel.mean()))


def fit_prefill(samples: Sequence[PrefillSample]) -> tuple[Coeffs, FitReport]:
    return fit_relative([sum(s.prompt_lens) for s in samples],
                        [sum(n * n for n in s.prompt_lens) for s in samples],
                        [s.seconds for s in samples])


def fit_decode(samples: Sequence[DecodeSample]) -> tuple[Coeffs, FitReport]:
    return fit_relative([sum(s.context_lens) for s in samples], [len(s.context_lens) for s in samples],
                        [s.seconds for s in samples])


def fit_profile(prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample],
                large_batch_threshold: int) -> tuple[PhaseProfile, dict[str, FitReport]]:
    """Prefill fit plus two decode fits split at `large_batch_threshold` (batch size). When one
    side of the split has fewer than 3 samples, both regimes share the fit over all samples.
    The measured curves cover prefill and the small-batch decode regime where the grid allows."""
    p, p_rep = fit_prefill(prefill)
    small = [s for s in decode if len(s.context_lens) <= large_batch_threshold]
    large = [s for s in decode if len(s.context_lens) > large_batch_threshold]
    small_fit, large_fit = (small, large) if len(small) >= 3 and len(large) >= 3 else (decode, decode)
    ds, ds_rep = fit_decode(small_fit)
    dl, dl_rep = fit_decode(large_fit)
    reports = {"prefill": p_rep, "decode_small": ds_rep, "decode_large": dl_rep}
    curves: dict[str, Curve | None] = {"prefill_curve": None, "decode_curve": None}
    for name, fitted in (
            ("prefill_curve", fit_curve([sum(s.prompt_lens) for s in prefill],
                                        [sum(n * n for n in s.prompt_lens) for s in prefill],
                                        [s.seconds for s in prefill])),
            ("decode_curve", fit_curve([len(s.context_lens) for s in small], [sum(s.context_lens) for s in small],
                                       [s.seconds for s in small]))):
        if fitted is not None and fitted[0].slope >= 0:  # a negative attention term is noise, not a fit
            curves[name], reports[name] = fitted
    profile = PhaseProfile(prefill=p, decode_small=ds, decode_large=dl, large_batch_threshold=large_batch_threshold,
                           prefill_tokens=curves["prefill_curve"], decode_batch=curves["decode_curve"])
    return profile, reports
