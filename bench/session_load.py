"""Replay chat sessions against an OpenAI chat endpoint: each turn after the previous answer plus a think time.

Sessions start at scheduled arrival times (open loop, `bench.arrivals`: Poisson or Gamma at `rate`
sessions/s). Within a session the loop is closed, as a person chats: turn k is sent `think_time_s`
after turn k−1's answer ends, and its messages are the system prompt, every earlier user message
with the answer the server streamed back, and user message k. A failed turn ends its session (the
later turns would have no history); its remaining turns are recorded as not sent.

Every turn yields one `TurnRecord` (a `RequestRecord` with its session and turn index), so the
goodput and attainment analysis of single-turn runs applies unchanged; bench/turn_stats.py adds the
per-turn view (TTFT by turn index, and the server's prefix-cache hits when it reports them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from pdserve.bench.arrivals import arrival_times
from pdserve.bench.client import Endpoint, send_request
from pdserve.bench.record import RequestRecord
from pdserve.bench.sessions import ChatSession
from pdserve.bench.workload import WorkloadRequest


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
