"""Statistics on hand-made traces: TPOT, joint attainment, failed requests, goodput interpolation,
SLO-scale sweeps."""

from __future__ import annotations

import math

import pytest

from pdserve.bench.goodput import goodput_from_curve, slo_scale_curve
from pdserve.bench.metrics import attainment, meets, min_slo_scale, slo_scale_needed
from pdserve.bench.summary import summarize
from pdserve.bench.record import RequestRecord
from pdserve.config import SLOConfig


def rec(ttft: float | None, e2e: float | None, tokens: int, ok: bool = True, wanted: int | None = None) -> RequestRecord:
    return RequestRecord(index=0, prompt_len=10, output_len=wanted or tokens, arrival_s=0.0, ok=ok,
                         error=None if ok else "HTTP 500", ttft_s=ttft, e2e_s=e2e, num_output_tokens=tokens)


def test_tpot_is_decode_time_over_tokens_after_the_first() -> None:
    assert rec(0.1, 0.5, 5).tpot_s == pytest.approx(0.1)
    assert rec(0.2, 0.3, 2).tpot_s == pytest.approx(0.1)


def test_one_output_token_has_no_tpot_and_meets_any_tpot_slo() -> None:
    one = rec(0.1, 0.1, 1)
    assert one.tpot_s is None
    assert meets(one, SLOConfig(ttft_s=0.2, tpot_s=1e-9))
    assert not meets(one, SLOConfig(ttft_s=0.05, tpot_s=1.0))
    assert slo_scale_needed(one, SLOConfig(0.2, 0.01)) == pytest.approx(0.5)
    s = summarize([one, rec(0.1, 0.5, 5)], SLOConfig(1, 1), rate=1.0, duration_s=1.0)
    assert s.tpot_s["mean"] == pytest.approx(0.1)  # only the 5-token request has a TPOT


def test_joint_attainment_needs_both_slos() -> None:
    slo = SLOConfig(ttft_s=0.2, tpot_s=0.05)
    trace = [rec(0.1, 0.26, 5),  # both ok (tpot 0.04)
             rec(0.3, 0.36, 3),  # ttft miss
             rec(0.1, 1.1, 11),  # tpot 0.1 miss
             rec(0.15, 0.3, 5)]  # both ok
    assert attainment(trace, slo) == pytest.approx(0.5)
    s = summarize(trace, slo, rate=2.0, duration_s=4.0)
    assert s.ttft_attainment == pytest.approx(0.75)
    assert s.tpot_attainment == pytest.approx(0.75)
    assert s.request_goodput == pytest.approx(2 / 4.0)


def test_failed_requests_are_misses_and_stay_in_the_denominator() -> None:
    slo = SLOConfig(1.0, 1.0)
    trace = [rec(0.1, 0.2, 3)] * 3 + [rec(None, None, 0, ok=False), rec(0.1, 0.2, 3, ok=False)]
    s = summarize(trace, slo, rate=1.0, duration_s=5.0)
    assert (s.num_requests, s.num_ok, s.num_failed) == (5, 3, 2)
    assert s.attainment == pytest.approx(0.6)
    assert s.ttft_s["p50"] == pytest.approx(0.1)  # latencies only over completed requests
    assert math.isinf(slo_scale_needed(trace[-1], slo))
    assert math.isinf(min_slo_scale(trace, SLOConfig(1.0, 1.0, attainment=0.9)))  # 2 of 5 failed
    assert min_slo_scale(trace, SLOConfig(1.0, 1.0, attainment=0.6)) == pytest.approx(0.1)


def test_all_failed_run_has_no_latencies() -> None:
    s = summarize([rec(None, None, 0, ok=False)] * 4, SLOConfig(1, 1), rate=1.0, duration_s=1.0)
    assert s.attainment == 0 and s.num_failed == 4 and s.ttft_s["p90"] is None


def test_short_responses_are_flagged() -> None:
    s = summarize([rec(0.1, 0.2, 3, wanted=8), rec(0.1, 0.2, 8)], SLOConfig(1, 1), rate=1.0, duration_s=1.0)
    assert s.num_short == 1


def test_min_slo_scale_is_the_target_quantile_of_needed_scales() -> None:
    slo = SLOConfig(ttft_s=1.0, tpot_s=0.1, attainment=0.8)
    # needed scales: max(ttft/1, tpot/0.1) = 0.5, 0.2, 1.0, 0.3, 2.0
    trace = [rec(0.5, 0.5, 1), rec(0.1, 0.3, 11), rec(0.2, 1.2, 11), rec(0.3, 0.3, 1), rec(2.0, 2.0, 1)]
    assert [slo_scale_needed(r, slo) for r in trace] == pytest.approx([0.5, 0.2, 1.0, 0.3, 2.0])
    assert min_slo_scale(trace, slo) == pytest.approx(1.0)  # 4 of 5 = 80% at scale 1.0
    assert attainment(trace, slo.scaled(1.0)) >= 0.8 > attainment(trace, slo.scaled(0.99))
    curve = slo_scale_curve([slo_scale_needed(r, slo) for r in trace], [2.0, 1.0, 0.4, 0.1])
    assert curve == [(2.0, 1.0), (1.0, 0.8), (0.4, 0.4), (0.1, 0.0)]


def test_goodput_interpolates_linearly_at_the_first_crossing() -> None:
    points = [(3.0, 0.8), (1.0, 1.0), (2.0, 0.95), (4.0, 0.92)]  # any order; the late recovery is noise
    g = goodput_from_curve(points, target=0.9, gpus=2)
    assert g.bracket == "interpolated"
    assert g.rate == pytest.approx(2.0 + (0.95 - 0.9) / (0.95 - 0.8))
    assert g.per_gpu == pytest.approx(g.rate / 2)


def test_goodput_exactly_at_target_and_out_of_range() -> None:
    assert goodput_from_curve([(1, 1.0), (2, 0.9), (3, 0.5)], 0.9).rate == pytest.approx(2.0)
    above = goodput_from_curve([(1, 1.0), (2, 0.95)], 0.9, gpus=4)
    assert (above.bracket, above.rate, above.per_gpu) == ("above_range", 2, 0.5)
    below = goodput_from_curve([(1, 0.5), (2, 0.2)], 0.9)
    assert (below.bracket, below.rate) == ("below_range", 0.0)
    assert goodput_from_curve([], 0.9).bracket == "no_data"
    with pytest.raises(ValueError, match="gpus"):
        goodput_from_curve([(1, 1.0)], 0.9, gpus=0)


def test_goodput_bounds_print_as_bounds_and_ratios_respect_them() -> None:
    exact = goodput_from_curve([(1, 1.0), (2, 0.5)], 0.9, gpus=2)  # 1.2 req/s, 0.6 /GPU
    above = goodput_from_curve([(1, 1.0), (2, 0.95)], 0.9, gpus=1)  # >= 2
    below = goodput_from_curve([(0.5, 0.8), (1, 0.5)], 0.9, gpus=1)  # < 0.5
    assert (exact.short(), exact.short(gpus=2)) == ("1.200", "0.600")
    assert (above.short(), below.short(), below.short(gpus=2)) == (">=2.000", "<0.500", "<0.250")
    assert "< 0.500 req/s" in below.describe() and "0.000" not in below.describe()
    assert exact.ratio_to(exact, 2, 2) == ("=", pytest.approx(1.0))
    assert above.ratio_to(exact, 1, 2) == (">=", pytest.approx(2 / 0.6))  # at least 2 /GPU over 0.6
    assert exact.ratio_to(above, 2, 1) == ("<=", pytest.approx(0.6 / 2))
    assert below.ratio_to(exact, 1, 2) == ("<", pytest.approx(0.5 / 0.6))
    assert exact.ratio_to(below, 2, 1) == (">", pytest.approx(0.6 / 0.5))
    assert above.ratio_to(above, 1, 1) is None and below.ratio_to(below, 1, 1) is None
    assert above.ratio_to(below, 1, 1) == (">", pytest.approx(4.0))
