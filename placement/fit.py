"""Fitting latency coefficients from measurements: least squares on relative error (each row of
the design matrix and its target divided by the measured time), so short and long batches weigh
the same, as DistServe fits its profiles. Pure numpy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.placement.latency import Coeffs, PhaseProfile


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
    side of the split has fewer than 3 samples, both regimes share the fit over all samples."""
    p, p_rep = fit_prefill(prefill)
    small = [s for s in decode if len(s.context_lens) <= large_batch_threshold]
    large = [s for s in decode if len(s.context_lens) > large_batch_threshold]
    if len(small) < 3 or len(large) < 3:
        small = large = list(decode)
    ds, ds_rep = fit_decode(small)
    dl, dl_rep = fit_decode(large)
    profile = PhaseProfile(prefill=p, decode_small=ds, decode_large=dl, large_batch_threshold=large_batch_threshold)
    return profile, {"prefill": p_rep, "decode_small": ds_rep, "decode_large": dl_rep}
