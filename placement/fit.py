"""Fitting latency coefficients from measurements: least squares on relative error (each row of
the design matrix and its target divided by the measured time), so short and long batches weigh
the same, as DistServe fits its profiles. Pure numpy.

Besides DistServe's linear coefficients, a profile gets the measured curves (latency.py): the
prefill time at each measured Σl and the decode time at each measured batch size, with the
attention term (c·Σl², b·Σctx) fitted jointly across all samples and taken out.

An in-situ profile fits the same model to the steps a serving engine ran (`fit_steps`, from
engine/step_log.py's records): the forwards as they run next to the host's other engines, at the
shapes the workload produces, mixed steps of chunked prefill included. Its prompts come in
whatever lengths the workload has, so prompt work keeps DistServe's form (a curve through single
measurements would fit their noise); the decode curve keeps the batch sizes measured often enough.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pdserve.placement.latency import Coeffs, Curve, PhaseProfile
from pdserve.placement.steps import decode_contexts, prompt_work, step_kind
from pdserve.placement.transfer import TransferModel
from pdserve.types import StepRecord


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


def fit_curve(keys: Sequence[float], x: Sequence[float], y: Sequence[float],
              min_samples_per_key: int = 1) -> tuple[Curve, FitReport] | None:
    """Fit y ≈ f(key) + s·x with one free value of f per distinct key and one shared slope s,
    minimising relative error; None when there are fewer than 2 keys or s is not identifiable
    (no key measured at two different x). Keys with fewer than `min_samples_per_key` samples are
    left out (the curve interpolates across them)."""
    counts = {k: keys.count(k) for k in set(keys)} if min_samples_per_key > 1 else {}
    if counts:
        kept = [i for i, k in enumerate(keys) if counts[k] >= min_samples_per_key]
        keys, x, y = [keys[i] for i in kept], [x[i] for i in kept], [y[i] for i in kept]
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
    profile, reports = _fit_decode_regimes(decode, large_batch_threshold, 1)
    reports["prefill"] = p_rep
    curve = fit_curve([sum(s.prompt_lens) for s in prefill], [sum(n * n for n in s.prompt_lens) for s in prefill],
                      [s.seconds for s in prefill])
    if curve is not None and curve[0].slope >= 0:  # a negative attention term is noise, not a fit
        profile, reports["prefill_curve"] = replace(profile, prefill_tokens=curve[0]), curve[1]
    return replace(profile, prefill=p), reports


def _fit_decode_regimes(decode: Sequence[DecodeSample], large_batch_threshold: int,
                        min_samples_per_key: int) -> tuple[PhaseProfile, dict[str, FitReport]]:
    """The decode half of a profile (its prefill coefficients are zero)."""
    small = [s for s in decode if len(s.context_lens) <= large_batch_threshold]
    large = [s for s in decode if len(s.context_lens) > large_batch_threshold]
    small_fit, large_fit = (small, large) if len(small) >= 3 and len(large) >= 3 else (decode, decode)
    ds, ds_rep = fit_decode(small_fit)
    dl, dl_rep = fit_decode(large_fit)
    reports = {"decode_small": ds_rep, "decode_large": dl_rep}
    curve = fit_curve([len(s.context_lens) for s in small], [sum(s.context_lens) for s in small],
                      [s.seconds for s in small], min_samples_per_key)
    if curve is not None and curve[0].slope >= 0:
        reports["decode_curve"] = curve[1]
    return PhaseProfile(prefill=Coeffs(0.0, 0.0, 0.0), decode_small=ds, decode_large=dl,
                        large_batch_threshold=large_batch_threshold,
                        decode_batch=curve[0] if "decode_curve" in reports else None), reports


def fit_steps(steps: Iterable[StepRecord], large_batch_threshold: int = 95,
              min_samples_per_key: int = 3) -> tuple[PhaseProfile, dict[str, FitReport]]:
    """An in-situ profile: the simulator's step model fitted to the steps an engine ran.

    Decode: `D(B) + b'·Σctx` (and DistServe's linear form) from the pure decode steps, batch
    sizes seen fewer than `min_samples_per_key` times interpolated. Prompt work: `a + b·x1 + c·x2`
    (x1 prompt tokens, x2 their attention, s·(2d + s) for s new tokens on d cached) from every
    step that carries any — alone it costs the whole step (the `a` term), beside B decodes it
    costs what the step took beyond `D(B) + b'·Σctx` (what `PhaseProfile.prefill_extra_s` adds in
    the simulator's chunked-prefill step). Fitted on relative error of the whole step."""
    steps = [s for s in steps if s.duration_s > 0]
    kinds = [step_kind(s) for s in steps]
    dec = [DecodeSample(tuple(decode_contexts(s)), s.duration_s) for s, k in zip(steps, kinds) if k == "decode"]
    prompt = [s for s, k in zip(steps, kinds) if k != "decode"]
    if len(prompt) < 3 or len(dec) < 3:
        raise ValueError(f"fit: need >= 3 steps with prompt tokens and >= 3 decode steps, got {len(prompt)} and {len(dec)}")
    profile, reports = _fit_decode_regimes(dec, large_batch_threshold, min_samples_per_key)
    rows, y, total = [], [], []
    for s in prompt:
        ctx = decode_contexts(s)
        rows.append((0.0 if ctx else 1.0, *prompt_work(s)))
        y.append(s.duration_s - (profile.decode_s(sum(ctx), len(ctx)) if ctx else 0.0))
        total.append(s.duration_s)
    design, t = np.asarray(rows), np.asarray(total)
    coef, *_ = np.linalg.lstsq(design / t[:, None], np.asarray(y) / t, rcond=None)
    rel = np.abs((design @ coef - np.asarray(y)) / t)
    reports["prefill"] = FitReport(float(rel.max()), float(rel.mean()))
    return replace(profile, prefill=Coeffs(*(float(v) for v in coef))), reports


def extend_decode(profile: PhaseProfile, shape: PhaseProfile, top: int = 3) -> PhaseProfile:
    """`profile`'s decode curve continued past its largest batch size with `shape`'s (a profile
    measured over a wider grid of batch sizes, e.g. `pdserve profile`), scaled by how much slower
    `profile` ran at its `top` largest batch sizes than `shape` there. An in-situ curve only knows
    the batch sizes its workload formed; past them the linear fit takes over, and from a handful
    of small batches it can be far off (SmolLM2 on this CPU: +30–50% at batch 9–13)."""
    mine, theirs = profile.decode_batch, shape.decode_batch
    if mine is None or theirs is None or theirs.xs[-1] <= mine.xs[-1]:
        return profile
    keys = mine.xs[-top:]
    scale = sum(mine.base(k) for k in keys) / sum(theirs.base(k) for k in keys)
    beyond = [k for k in theirs.xs if k > mine.xs[-1]]
    curve = Curve(mine.xs + tuple(beyond), mine.ys + tuple(scale * theirs.base(k) for k in beyond), mine.slope)
    return replace(profile, decode_batch=curve)


def fit_transfer(num_tokens: Sequence[int], seconds: Sequence[float], kv_bytes_per_token: float,
                 fallback_bytes_per_s: float, codec: str = "raw") -> TransferModel:
    """KV transfer time ≈ overhead + tokens × bytes per token ÷ bandwidth, by least squares on
    measured transfers (absolute error: they are all of one scale), overhead >= 0. Transfers
    measured under varying load may not grow with size at all; then the bandwidth is
    `fallback_bytes_per_s` (e.g. the link measured alone) and only the overhead is fitted."""
    t = np.asarray(num_tokens, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if len(y) < 1:
        raise ValueError("fit: no transfers to fit")
    slope, overhead = np.polyfit(t, y, 1) if len(set(num_tokens)) > 1 else (0.0, 0.0)
    if overhead < 0:
        overhead, slope = 0.0, float(t @ y / (t @ t))
    if slope <= 0:
        slope = kv_bytes_per_token / fallback_bytes_per_s
        overhead = max(0.0, float(np.mean(y - slope * t)))
    return TransferModel(kv_bytes_per_token=kv_bytes_per_token, bytes_per_s=kv_bytes_per_token / slope,
                         codec=codec, overhead_s=float(overhead))
