"""Engine steps as the latency model reads them: the shape of a recorded `StepRecord` (what kind of
step, its decode contexts, its prompt work), the model's time for that shape, and step logs read
back from JSON lines.

The engine records a step as it ran (`pdserve.types.StepRecord`: per chunk, new tokens on top of
cached ones); everything here is the planner's reading of it, for in-situ profiles (`fit.fit_steps`,
`pdserve profile --from-steps`) and the simulator-fidelity calibration (calibrate.py, host_speed.py).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pdserve.placement.latency import PhaseProfile
from pdserve.types import StepRecord

StepLogs = dict[str, list[StepRecord]]  # by worker id, in step order


def step_kind(s: StepRecord) -> Literal["prefill", "decode", "mixed"]:
    """prefill: only fresh prompts; decode: one new token per sequence on a cache; else mixed."""
    if not any(s.cached_tokens):
        return "prefill"
    return "mixed" if prompt_chunks(s) else "decode"


def decode_contexts(s: StepRecord) -> list[int]:
    """Context length (cached + the new token) of each decoding sequence: one new token on a cache."""
    return [c + 1 for n, c in zip(s.new_tokens, s.cached_tokens) if n == 1 and c > 0]


def prompt_chunks(s: StepRecord) -> list[tuple[int, int]]:
    """(new, cached) of every chunk that is prompt work: a fresh prompt or a piece of one."""
    return [(n, c) for n, c in zip(s.new_tokens, s.cached_tokens) if not (n == 1 and c > 0)]


def prompt_work(s: StepRecord) -> tuple[int, int]:
    """(prompt tokens, their attention Σ s·(2d + s) for s new tokens on d cached): the x1, x2 of
    the latency model's prompt term."""
    chunks = prompt_chunks(s)
    return sum(n for n, _ in chunks), sum(n * (2 * c + n) for n, c in chunks)


def step_time(profile: PhaseProfile, s: StepRecord) -> float:
    """The simulator's time for this step's shape (a prefill batch, a decode batch, or a decode
    batch carrying prompt chunks), in seconds."""
    ctx, (x1, x2) = decode_contexts(s), prompt_work(s)
    if not ctx:
        return profile.prefill_s(x1, x2)
    return profile.decode_s(sum(ctx), len(ctx)) + (profile.prefill_extra_s(len(ctx), x1, x2) if x1 else 0.0)


def read_step_log(path: str | Path) -> StepLogs:
    """A JSON-lines step log ({"worker", **StepRecord.to_json()}, other keys ignored), by worker.
    Written by benchmarks/headline.py (steps.jsonl) from `Deployment.step_logs`."""
    logs: StepLogs = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                d = json.loads(line)
                logs.setdefault(str(d.get("worker", "")), []).append(StepRecord.from_json(d))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a step record ({e})") from None
    return logs


def steps_by(path: str | Path, key: str) -> dict[float, StepLogs]:
    """A step log's records ({"worker", key, **StepRecord}, as headline.py writes them) by `key`
    (e.g. "rate", "probe"), then by worker."""
    out: dict[float, StepLogs] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            out.setdefault(float(d[key]), {}).setdefault(d["worker"], []).append(StepRecord.from_json(d))
    return out


def overlapped(logs: StepLogs) -> Iterator[tuple[StepRecord, float]]:
    """Every step, with the fraction of it that other engines' steps overlapped."""
    spans = sorted((s.start_s, s.start_s + s.duration_s, w) for w, log in logs.items() for s in log)
    for w, log in logs.items():
        others = [(a, b) for a, b, w2 in spans if w2 != w]
        starts = [a for a, _ in others]
        for s in log:
            end, i, overlap = s.start_s + s.duration_s, max(0, bisect.bisect_left(starts, s.start_s) - 1), 0.0
            while i < len(others) and others[i][0] < end:
                overlap += max(0.0, min(end, others[i][1]) - max(s.start_s, others[i][0]))
                i += 1
            yield s, overlap / s.duration_s if s.duration_s > 0 else 0.0
