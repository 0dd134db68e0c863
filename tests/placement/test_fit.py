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
    pre, dec = measure(Grid(max_batch_tokens=65536), *_timers(0.05, seed=1))
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
