"""Replay chat sessions against an OpenAI chat endpoint: each turn after the previous answer plus a think time.

Sessions start at scheduled arrival times (open loop, `bench.arrivals`: Poisson or Gamma at `rate`
sessions/s). Within a session the loop is closed, as a person chats: turn k is sent `think_time_s`
after turn k−1's answer ends, and its messages are the system prompt, every earlier user message
with the answer the server streamed back, and user message k. A failed turn ends its session (the
later turns would have no history); its remaining turns are recorded as not sent.

Every turn yields one `TurnRecord` (a `RequestRecord` with its session and turn index), so the
goodput and attainment analysis of single-turn runs applies unchanged; `turn_stats` adds the
per-turn view (TTFT by turn index, and the server's prefix-cache hits when it reports them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import numpy as np

from pdserve.bench.arrivals import arrival_times
from pdserve.bench.client import Endpoint, send_request
from pdserve.bench.record import RequestRecord
from pdserve.bench.sessions import ChatSession
from pdserve.bench.workload import WorkloadRequest

CACHED_TOKENS_KEY = "cached_tokens"  # the server breakdown's prompt tokens served from a prefix cache


@dataclass
class TurnRecord(RequestRecord):
    session: int = 0
    turn: int = 0


@dataclass(frozen=True)
class SessionLoadConfig:
    rate: float  # new sessions per second
    think_time_s: float = 1.0  # from the end of an answer to the next turn's request
    cv: float = 1.0  # Gamma inter-arrival CV of session starts; 1 = Poisson
    seed: int = 0
    timeout_s: float = 600.0  # per turn

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate: must be > 0 sessions/s, got {self.rate}")
        if self.think_time_s < 0:
            raise ValueError(f"think_time_s: must be >= 0, got {self.think_time_s}")


async def run_sessions(endpoint: Endpoint, sessions: Sequence[ChatSession],
                       cfg: SessionLoadConfig) -> list[TurnRecord]:
    """One record per turn of every session, in session then turn order."""
    if not endpoint.chat:
        raise ValueError(f"endpoint: sessions need a chat endpoint, got {endpoint.path}")
    starts = arrival_times(len(sessions), cfg.rate, cfg.cv, cfg.seed)
    records = [[TurnRecord(0, s.prompt_len(k), t.output_len, 0.0, session=i, turn=k) for k, t in enumerate(s.turns)]
               for i, s in enumerate(sessions)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.perf_counter() + 0.05
        await asyncio.gather(*(_one_session(http, endpoint, s, recs, t0 + start, t0, cfg)
                               for s, recs, start in zip(sessions, records, starts)))
    flat = [r for recs in records for r in recs]
    for i, r in enumerate(flat):
        r.index = i
    return flat


async def _one_session(http: aiohttp.ClientSession, endpoint: Endpoint, session: ChatSession,
                       records: list[TurnRecord], start: float, t0: float, cfg: SessionLoadConfig) -> None:
    history: list[tuple[str, str]] = [("system", session.system)] if session.system else []
    send_at = start
    for turn, record in zip(session.turns, records):
        await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
        record.arrival_s = send_at - t0
        history.append(("user", turn.user))
        req = WorkloadRequest(turn.user, record.prompt_len, turn.output_len, messages=tuple(history))
        answer = await send_request(http, endpoint, req, record, send_at, cfg.timeout_s)
        if not record.ok:
            return  # later turns stay not-ok with no error: never sent
        history.append(("assistant", answer))
        send_at = time.perf_counter() + cfg.think_time_s


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
