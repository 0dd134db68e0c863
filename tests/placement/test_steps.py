"""The planner's reading of engine steps: kind, decode contexts, prompt work, the model's time."""

from __future__ import annotations

import json

import pytest

from pdserve.placement.latency import Coeffs, PhaseProfile
from pdserve.placement.steps import (decode_contexts, overlapped, prompt_chunks, prompt_work, read_step_log,
                                     step_kind, step_time)
from pdserve.types import StepRecord

PROFILE = PhaseProfile(prefill=Coeffs(0.02, 3e-3, 1e-7), decode_small=Coeffs(0.035, 2e-6, 1e-3),
                       decode_large=Coeffs(0.035, 2e-6, 1e-3))


def test_kind_and_json_round_trip() -> None:
    prefill = StepRecord(1.0, 0.2, (5, 3), (0, 0))
    decode = StepRecord(1.0, 0.05, (1, 1), (9, 30))
    mixed = StepRecord(1.0, 0.1, (1, 8), (9, 0))
    chunk = StepRecord(1.0, 0.1, (8,), (16,))  # a later chunk of one prompt attends to its cached part
    assert [step_kind(r) for r in (prefill, decode, mixed, chunk)] == ["prefill", "decode", "mixed", "mixed"]
    assert all(StepRecord.from_json(r.to_json()) == r for r in (prefill, decode, mixed))


def test_shape_and_model_time_of_a_mixed_step() -> None:
    s = StepRecord(1.0, 0.1, (1, 1, 8, 4), (9, 30, 16, 0))  # two decodes, a later chunk, a fresh prompt
    assert decode_contexts(s) == [10, 31]
    assert prompt_chunks(s) == [(8, 16), (4, 0)]
    assert prompt_work(s) == (12, 8 * (32 + 8) + 4 * 4)
    want = PROFILE.decode_s(41, 2) + PROFILE.prefill_extra_s(2, 12, 8 * 40 + 16)
    assert step_time(PROFILE, s) == pytest.approx(want)
    assert step_time(PROFILE, StepRecord(0.0, 0.1, (300,), (0,))) == pytest.approx(PROFILE.prefill_s(300, 300 ** 2))


def test_step_log_by_worker_and_overlap(tmp_path) -> None:
    lines = [{"worker": "a", "start_s": 0.0, "duration_s": 1.0, "new": [1], "cached": [9]},
             {"worker": "b", "start_s": 0.75, "duration_s": 1.0, "new": [5], "cached": [0], "rate": 2.0}]
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    logs = read_step_log(path)
    assert list(logs) == ["a", "b"] and logs["b"][0].new_tokens == (5,)
    assert sorted(f for _, f in overlapped(logs)) == pytest.approx([0.25, 0.25])
    path.write_text('{"worker": "a", "start_s": 0.0}\n')
    with pytest.raises(ValueError, match="steps.jsonl:1: not a step record"):
        read_step_log(path)
