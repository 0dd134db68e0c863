"""The engine's step log: what ran, in order, numbered since start, bounded."""

from __future__ import annotations

import itertools

from pdserve.engine.step_log import StepLog
from pdserve.placement.steps import step_kind
from pdserve.types import StepRecord
from tests.engine.test_engine import PROMPTS, _engine, _generate


def test_keeps_the_last_steps_numbered_since_start() -> None:
    log = StepLog(capacity=3)
    recs = [StepRecord(float(i), 0.1, (1,), (i + 1,)) for i in range(5)]
    for r in recs:
        log.append(r)
    assert log.total == 5
    assert log.since(0) == (2, recs[2:])  # 0 and 1 were dropped: the reply says where it starts
    assert log.since(3) == (3, recs[3:])
    assert log.since(5) == (5, [])


def test_engine_logs_every_step_it_runs(tiny_llama) -> None:
    path, _ = tiny_llama
    engine = _engine(path)
    stats: dict = {}
    _generate(engine, PROMPTS, policy="chunked", budget=8, stats=stats)
    first, steps = engine.step_log.since(0)
    assert first == 0 and len(steps) == engine.num_steps and stats["preemptions"] == 0
    # every prompt token and every sampled token but the last passes through one forward, once
    assert sum(sum(s.new_tokens) for s in steps) == sum(len(p) + 16 - 1 for p in PROMPTS)
    assert {step_kind(s) for s in steps} == {"prefill", "mixed", "decode"}
    assert steps[0].cached_tokens == (0, 0, 0) and steps[0].new_tokens == (5, 2, 1)
    assert all(s.duration_s > 0 for s in steps)
    assert all(a.start_s + a.duration_s <= b.start_s + 1e-5 for a, b in itertools.pairwise(steps))
