"""Per-turn statistics of a multi-turn session run (bench/session_load.py): TTFT by turn index, the
first turn against the later ones, and the share of prompt tokens the server did not compute or move
because it held them already, when it reports them.

Prefix hits come from pdserve's per-request breakdown (`pdserve_timings`): `cached_tokens` (prompt
tokens the instance that computed the prompt found in its prefix cache) and `pull_skipped_tokens`
(prompt tokens a disaggregated KV pull did not move, decode's cache holding them). The breakdown
leaves a key out when it is 0, so over the turns that carry a breakdown a missing key counts 0; the
denominator is the server's own prompt token count (`usage.prompt_tokens`, chat template included)
when it sends one, else the client's estimate. A server that sends no breakdown gets None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pdserve.bench.session_load import TurnRecord

CACHED_TOKENS_KEY = "cached_tokens"  # pdserve_timings: prompt tokens the computing instance had cached
PULL_SKIPPED_KEY = "pull_skipped_tokens"  # pdserve_timings: prompt tokens a KV pull did not move


@dataclass(frozen=True)
class TurnStats:
    """One turn index (`and_later`: that turn and every later one), 0-based `turn`."""

    turn: int
    and_later: bool
    num: int
    ok: int
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    prompt_tokens_mean: float
    cached_fraction: float | None  # server-reported cached prompt tokens / prompt tokens
    pull_skipped_fraction: float | None  # prompt tokens a KV pull skipped / prompt tokens

    @property
    def label(self) -> str:
        """1-based, as people count turns: "1", "3", "2+"."""
        return f"{self.turn + 1}{'+' if self.and_later else ''}"

    def to_dict(self) -> dict:
        return {"turns": self.label, **asdict(self)}


def turn_stats(records: Sequence[TurnRecord]) -> list[TurnStats]:
    """One `TurnStats` per turn index present, in turn order."""
    return [_stats(k, False, [r for r in records if r.turn == k]) for k in sorted({r.turn for r in records})]


def first_and_later(records: Sequence[TurnRecord]) -> list[TurnStats]:
    """Turn 1 (nothing to reuse but a shared system prompt) against turns 2+ (the history is reusable)."""
    return [_stats(0, False, [r for r in records if r.turn == 0]), _stats(1, True, [r for r in records if r.turn > 0])]


def _stats(turn: int, and_later: bool, rs: Sequence[TurnRecord]) -> TurnStats:
    done = [r for r in rs if r.ok and r.ttft_s is not None]
    ttfts = [r.ttft_s for r in done]
    reported = [r for r in done if r.server_timings]
    prompt = sum(_prompt_tokens(r) for r in reported)

    def fraction(key: str) -> float | None:
        return sum(r.server_timings.get(key, 0.0) for r in reported) / prompt if reported and prompt else None

    return TurnStats(turn, and_later, len(rs), len(done),
                     float(np.percentile(ttfts, 50)) if ttfts else None,
                     float(np.percentile(ttfts, 90)) if ttfts else None,
                     float(np.mean([_prompt_tokens(r) for r in rs])) if rs else 0.0,
                     fraction(CACHED_TOKENS_KEY), fraction(PULL_SKIPPED_KEY))


def _prompt_tokens(r: TurnRecord) -> int:
    return r.num_prompt_tokens if r.num_prompt_tokens is not None else r.prompt_len
