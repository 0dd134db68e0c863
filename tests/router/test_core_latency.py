"""LatencyBreakdown: the one typed per-request breakdown from the workers through the router to
the metrics and the HTTP `pdserve_timings` object."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from pdserve.router.metrics import RouterMetrics
from pdserve.types import LatencyBreakdown, StepOutput

PREFILL = LatencyBreakdown(prefill_queue_s=0.25, prefill_s=1.0)
PULL = LatencyBreakdown(decode_queue_s=0.5, transfer_s=0.125, transfer_bytes=4096, kv_pull="ok")


def test_parts_add_over_roles_and_attempts() -> None:
    both = PREFILL + PULL
    assert (both.prefill_queue_s, both.prefill_s, both.decode_queue_s, both.transfer_s) == (0.25, 1.0, 0.5, 0.125)
    assert both.queue_s == 0.75 and both.transfer_bytes == 4096 and both.kv_pull == "ok" and not both.kv_recomputed
    failed = LatencyBreakdown(decode_queue_s=0.5, transfer_s=2.0, kv_pull="failed", kv_recomputed=True)
    again = PREFILL + failed + PREFILL  # a failed pull, recomputed: the recompute is prefill time too
    assert again.prefill_s == 2.0 and again.kv_recomputed and again.kv_pull == "failed"
    assert again.transfer_bytes is None and again.decode_queue_s == 0.5
    assert (PREFILL + LatencyBreakdown()).decode_queue_s is None  # no pull started: none reported


def test_finalize_splits_e2e_into_the_four_phases() -> None:
    final = (PREFILL + PULL).finalize(ttft_s=1.5, e2e_s=3.0)
    assert final.decode_s == pytest.approx(3.0 - 0.75 - 1.0 - 0.125)
    assert sum(final.phases().values()) == pytest.approx(final.e2e_s)
    assert PREFILL.finalize(ttft_s=0.5, e2e_s=0.5).decode_s == 0.0  # clocks disagree: never negative


def test_json_keeps_the_http_keys() -> None:
    final = (PREFILL + PULL).finalize(ttft_s=1.5, e2e_s=3.0)
    assert final.to_json() == {"queue_s": 0.75, "prefill_s": 1.0, "transfer_s": 0.125, "decode_s": final.decode_s,
                               "ttft_s": 1.5, "e2e_s": 3.0, "decode_queue_s": 0.5, "transfer_bytes": 4096.0}
    colocated = PREFILL.finalize(ttft_s=1.5, e2e_s=2.0).to_json()
    assert set(colocated) == {"queue_s", "prefill_s", "transfer_s", "decode_s", "ttft_s", "e2e_s"}
    assert LatencyBreakdown(kv_recomputed=True).to_json()["kv_recomputed"] == 1.0


def test_crosses_process_boundaries_and_is_immutable() -> None:
    out = StepOutput("r", (1,), latency=PREFILL + PULL)
    assert pickle.loads(pickle.dumps(out)) == out
    with pytest.raises(dataclasses.FrozenInstanceError):
        PULL.transfer_s = 1.0  # type: ignore[misc]


def test_metrics_observe_each_phase() -> None:
    m = RouterMetrics()
    m.observe_finish("length", 4, 3, (PREFILL + PULL).finalize(ttft_s=1.5, e2e_s=3.0))
    m.observe_finish("length", 4, 3, PREFILL.finalize(ttft_s=1.5, e2e_s=2.0))  # colocated: no decode queue
    m.observe_finish("error", 4, 0, None)

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    assert value("pdserve_queue_time_seconds_sum") == pytest.approx(0.75 + 0.25)
    assert value("pdserve_kv_transfer_time_seconds_sum") == pytest.approx(0.125)
    assert value("pdserve_phase_queue_time_seconds_sum", phase="prefill") == pytest.approx(0.5)
    assert value("pdserve_phase_queue_time_seconds_count", phase="decode") == 1.0
    assert value("pdserve_kv_transfer_bytes_total") == 4096.0
    assert value("pdserve_e2e_request_latency_seconds_count") == 2.0
    assert value("pdserve_requests_total", finish_reason="error") == 1.0
