"""Profiling: the grid, the relative-error least-squares fit, the profile file round trip."""

from __future__ import annotations

import random

import pytest

from pdserve.placement.fit import fit_relative
from pdserve.placement.latency import Coeffs, PhaseProfile
from pdserve.placement.model_spec import load_model
from pdserve.placement.profile import Grid, fit_and_write, measure
from pdserve.placement.profile_file import load_profile

TRUE = PhaseProfile(prefill=Coeffs(0.012, 2.0e-4, 3.0e-8), decode_small=Coeffs(0.010, 3.0e-7, 1.5e-4),
                    decode_large=Coeffs(0.004, 2.5e-7, 3.0e-4), large_batch_threshold=95)


def _timers(noise: float, seed: int = 0):
    rng = random.Random(seed)

    def prefill(lens):
        return TRUE.prefill_s(sum(lens), sum(n * n for n in lens)) * (1 + rng.uniform(-noise, noise))

    def decode(lens):
        return TRUE.decode_s(sum(lens), len(lens)) * (1 + rng.uniform(-noise, noise))

    return prefill, decode


def test_grid_respects_token_budget():
    g = Grid(max_batch_tokens=4096, max_len=1024)
    pts = g.points()
    assert pts and all(b * n <= 4096 and n <= 1024 for b, n in pts)
    assert (192, 16) in pts and (1, 1024) in pts and (8, 1024) not in pts


def test_fit_recovers_coefficients_from_exact_measurements():
    pre, dec = measure(Grid(max_batch_tokens=65536), *_timers(0.0))
    path_free_fit = fit_relative([1, 2, 3, 4], [1, 4, 9, 16], [1 + 2 * x + 3 * x * x for x in (1, 2, 3, 4)])[0]
    assert (path_free_fit.a, path_free_fit.b, path_free_fit.c) == pytest.approx((1, 2, 3))
    from pdserve.placement.fit import fit_profile
    prof, report = fit_profile(pre, dec, 95)
    assert prof.prefill.b == pytest.approx(TRUE.prefill.b, rel=1e-6)
    assert prof.decode_large.c == pytest.approx(TRUE.decode_large.c, rel=1e-6)
    assert report["prefill"].max_rel_error < 1e-9


def test_fit_with_noise_predicts_within_noise(tmp_path):
    pre, dec = measure(Grid(max_batch_tokens=65536, max_decode_tokens=65536), *_timers(0.05, seed=1))
    path = tmp_path / "profile.json"
    prof, report = fit_and_write(path, "HuggingFaceTB/SmolLM2-135M-Instruct", 1, pre, dec)
    assert report["prefill"].mean_rel_error < 0.05
    for lens in ([700], [128] * 16, [2000, 30]):
        want = TRUE.prefill_s(sum(lens), sum(n * n for n in lens))
        assert prof.prefill_s(sum(lens), sum(n * n for n in lens)) == pytest.approx(want, rel=0.05)
    for b, ctx in ((4, 500), (64, 900), (160, 300)):
        assert prof.decode_s(b * ctx, b) == pytest.approx(TRUE.decode_s(b * ctx, b), rel=0.05)
    loaded = load_profile(str(path)).profile(load_model("smollm2-135m"), 1)  # keyed by hf_name
    assert loaded is not None and loaded.prefill.b == pytest.approx(prof.prefill.b)
    fit_and_write(path, "other", 2, pre, dec)  # merges, keeps the first entry
    assert load_profile(str(path)).models() == ["HuggingFaceTB/SmolLM2-135M-Instruct", "other"]


def test_fit_rejects_too_few_points():
    with pytest.raises(ValueError, match="3 positive"):
        fit_relative([1, 2], [1, 2], [1.0, 2.0])


def test_measured_curves_capture_what_the_linear_form_cannot(tmp_path):
    """A CPU-like engine: decode step time jumps from B=1 to B=2 and B=3 costs more than B=4;
    prefill gets dearer per token past 256 tokens. The curves reproduce every measured point and
    survive the profile file; the linear fit misses some small batch by more than 10%."""
    step = {1: 0.056, 2: 0.086, 3: 0.104, 4: 0.090, 5: 0.097, 6: 0.104, 7: 0.106, 8: 0.107}

    def decode(lens):
        return step.get(len(lens), 0.1 + 0.004 * len(lens)) + 1.3e-5 * sum(lens)

    def prefill(lens):
        s = sum(lens)
        return 0.05 + 3.0e-3 * s + (0.5e-3 * (s - 256) if s > 256 else 0.0) + 4e-7 * sum(n * n for n in lens)

    grid = Grid(max_batch_tokens=1024, max_len=512, max_decode_tokens=4096)
    pre, dec = measure(grid, prefill, decode)
    prof, report = fit_and_write(tmp_path / "p.json", "m", 1, pre, dec)
    assert report["decode_curve"].max_rel_error < 1e-9 and report["prefill_curve"].max_rel_error < 1e-9
    assert prof.decode_batch is not None and prof.decode_batch.slope == pytest.approx(1.3e-5)
    for b, ctx in ((1, 300), (2, 300), (3, 100), (4, 500), (7, 16)):
        assert prof.decode_s(b * ctx, b) == pytest.approx(decode([ctx] * b), rel=1e-9)
    for lens in ([300], [256, 256], [128] * 8, [500, 12]):
        assert prof.prefill_s(sum(lens), sum(n * n for n in lens)) == pytest.approx(prefill(lens), rel=0.01)
    linear_miss = max(abs(prof.decode_small(b * 128, b) / decode([128] * b) - 1) for b in step)
    assert linear_miss > 0.10
    loaded = load_profile(str(tmp_path / "p.json")).table["m"][1]
    assert loaded.decode_batch is not None and loaded.prefill_tokens is not None
    for b in (1, 2, 3, 4, 8):
        assert loaded.decode_s(b * 128, b) == pytest.approx(prof.decode_s(b * 128, b), rel=1e-12)
    assert loaded.prefill_s(700, 700**2) == pytest.approx(prof.prefill_s(700, 700**2), rel=1e-12)


def test_extend_decode_continues_a_short_curve_with_the_wider_grid_scaled():
    from pdserve.placement.fit import extend_decode
    from pdserve.placement.latency import Curve

    zero = Coeffs(0.0, 0.0, 0.0)
    grid = PhaseProfile(prefill=zero, decode_small=zero, decode_large=zero,
                        decode_batch=Curve((1, 2, 3, 4, 8, 16), (0.05, 0.08, 0.09, 0.1, 0.12, 0.16), 1e-5))
    # served 1.2× slower than the grid at batches 2-4, 1.0× at 1; a linear fit with a steep c beyond
    situ = PhaseProfile(prefill=zero, decode_small=Coeffs(0.02, 1e-5, 0.03), decode_large=zero,
                        decode_batch=Curve((1, 2, 3, 4), (0.05, 0.096, 0.108, 0.12), 2e-5))
    out = extend_decode(situ, grid)
    assert out.decode_batch.xs == (1, 2, 3, 4, 8, 16) and out.decode_batch.slope == 2e-5
    assert out.decode_s(0, 3) == pytest.approx(0.108)  # the measured part is kept
    assert out.decode_s(0, 8) == pytest.approx(1.2 * 0.12)  # not 0.02 + 0.03·8 = 0.26
    assert out.decode_s(1000, 16) == pytest.approx(1.2 * 0.16 + 2e-5 * 1000)
    assert situ.decode_s(0, 8) == pytest.approx(0.26)
    assert extend_decode(out, grid) == out  # nothing left to extend
