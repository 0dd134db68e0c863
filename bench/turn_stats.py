"""Per-turn statistics of a multi-turn session run (bench/session_load.py): TTFT by turn index and
the share of prompt tokens the server found in its prefix cache, when it reports them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.bench.session_load import TurnRecord

CACHED_TOKENS_KEY = "cached_tokens"  # pdserve_timings: prompt tokens the computing instance had cached


@dataclass(frozen=True)
class TurnStats:
    turn: int
    num: int
    ok: int
    ttft_p50_s: float | None
    prompt_tokens_mean: float
    cached_fraction: float | None  # server-reported cached prompt tokens / prompt tokens


def turn_stats(records: Sequence[TurnRecord]) -> list[TurnStats]:
    """Per turn index: count, successes, TTFT p50, and prefix-cache hits when the server reports them."""
    out = []
    for k in sorted({r.turn for r in records}):
        rs = [r for r in records if r.turn == k]
        done = [r for r in rs if r.ok and r.ttft_s is not None]
        cached = [r for r in done if CACHED_TOKENS_KEY in r.server_timings]
        out.append(TurnStats(
            k, len(rs), len(done),
            float(np.median([r.ttft_s for r in done])) if done else None,
            float(np.mean([r.prompt_len for r in rs])),
            (sum(r.server_timings[CACHED_TOKENS_KEY] for r in cached) / max(1, sum(r.prompt_len for r in cached))
             if cached else None)))
    return out
