"""Multi-turn workloads for planning: sessions read from a lengths file (`SessionWorkload`), and the
closed-loop traces drawn from them (`SessionTrace`).

A session is a conversation: turn k's prompt is turn k−1's prompt, its answer and a new message
(the lengths file's contract, `pdserve.bench.lengths`), so `reusable` tokens of it were already
computed by turn k−1, and `shared_prefix_len` tokens are shared with every request of the same
shared prefix (one system prompt). A trace resamples whole sessions; turn 0 of each arrives at a
time drawn by bench's arrival process, turn k > 0 when turn k−1 finished plus its think time
(closed loop: the simulator schedules it, `sim_reuse.SessionReuse`).

Requests are laid out session by session, sessions in start order, so `head(n)` keeps the first
sessions (the last one possibly cut) and the warm-up share of a trace is its first sessions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pdserve.bench.arrivals import arrival_times
from pdserve.bench.lengths import RequestLengths
from pdserve.placement.workload import Trace, WorkloadLengths


@dataclass(frozen=True)
class SessionTrace(Trace):
    """A `Trace` whose `unit_arrivals` are meaningful for turn 0 only (the others arrive when
    their previous turn finishes, `next_turn`); `timed`: the turn-0 requests, in arrival order."""

    next_turn: tuple[int, ...] = ()  # index of the session's next turn, -1 for its last
    reusable: tuple[int, ...] = ()  # tokens of the previous turn's prompt + answer (0 on turn 0)
    shared_lens: tuple[int, ...] = ()  # shared_prefix_len of each request
    think_s: tuple[float, ...] = ()  # wait after the previous turn's answer (seconds, not scaled by rate)
    session_ids: tuple[int, ...] = ()  # the sampled session each request belongs to
    timed: tuple[int, ...] = ()

    def head(self, n: int) -> SessionTrace:
        if n >= len(self):
            return self
        return SessionTrace(self.unit_arrivals[:n], self.prompt_lens[:n], self.output_lens[:n],
                            tuple(k if k < n else -1 for k in self.next_turn[:n]), self.reusable[:n],
                            self.shared_lens[:n], self.think_s[:n], self.session_ids[:n],
                            tuple(r for r in self.timed if r < n))

    def new_lens(self) -> tuple[int, ...]:
        """Prompt tokens each request computes at best (its history and shared prefix cached)."""
        return tuple(p - max(u, s) if max(u, s) < p else 1
                     for p, u, s in zip(self.prompt_lens, self.reusable, self.shared_lens))


@dataclass(frozen=True)
class SessionWorkload(WorkloadLengths):
    """`WorkloadLengths` (every request, flattened, for the length statistics the search reads)
    plus the sessions: each a tuple of request indices in turn order (a single-turn request is a
    one-turn session), and each request's shared prefix and think time."""

    sessions: tuple[tuple[int, ...], ...] = ()
    shared_lens: tuple[int, ...] = ()
    think_s: tuple[float, ...] = ()

    @classmethod
    def of(cls, name: str, items: list[RequestLengths]) -> SessionWorkload:
        by_id: dict[object, list[int]] = {}
        sessions: list[list[int]] = []
        for i, it in enumerate(items):
            if it.session is None:
                sessions.append([i])
            elif it.session in by_id:
                by_id[it.session].append(i)
            else:
                by_id[it.session] = [i]
                sessions.append(by_id[it.session])
        return cls(name, tuple(it.prompt_len for it in items), tuple(it.output_len for it in items),
                   tuple(tuple(s) for s in sessions), tuple(it.shared_prefix_len for it in items),
                   tuple(float(it.think_time_s) for it in items))

    @property
    def mean_turns(self) -> float:
        return len(self.prompt_lens) / len(self.sessions)

    def trace(self, num_requests: int, seed: int = 0, cv: float = 1.0) -> SessionTrace:
        """Whole sessions resampled until `num_requests` requests; session starts from bench's
        arrival process at 1 / mean-turns sessions per second, so the offered load is 1 req/s
        (scaled by `Trace.arrivals(rate)` like any trace)."""
        rng = random.Random(seed)
        picked: list[tuple[int, ...]] = []
        total = 0
        while total < num_requests:
            picked.append(self.sessions[rng.randrange(len(self.sessions))])
            total += len(picked[-1])
        starts = arrival_times(len(picked), len(picked) / total, cv, seed)
        cols: dict[str, list] = {k: [] for k in ("t", "p", "o", "next", "reuse", "shared", "think", "sid", "timed")}
        for sid, (session, t0) in enumerate(zip(picked, starts)):
            for k, i in enumerate(session):
                prev = session[k - 1] if k else None
                cols["timed"].extend([len(cols["t"])] if k == 0 else [])
                cols["t"].append(t0 if k == 0 else 0.0)
                cols["p"].append(self.prompt_lens[i])
                cols["o"].append(self.output_lens[i])
                cols["next"].append(len(cols["t"]) if k + 1 < len(session) else -1)
                cols["reuse"].append(0 if prev is None else self.prompt_lens[prev] + self.output_lens[prev])
                cols["shared"].append(self.shared_lens[i])
                cols["think"].append(self.think_s[i] if k else 0.0)
                cols["sid"].append(sid)
        return SessionTrace(*(tuple(cols[k]) for k in ("t", "p", "o", "next", "reuse", "shared", "think", "sid",
                                                        "timed")))


def has_sessions(items: list[RequestLengths]) -> bool:
    """Whether a lengths file describes reuse (sessions or shared prefixes)."""
    return any(it.session is not None or it.shared_prefix_len for it in items)


def as_sessions(trace: Trace) -> SessionTrace:
    """A single-turn trace as sessions of one turn each (nothing reusable, nothing shared)."""
    n = len(trace)
    return SessionTrace(trace.unit_arrivals, trace.prompt_lens, trace.output_lens, (-1,) * n, (0,) * n, (0,) * n,
                        (0.0,) * n, tuple(range(n)), tuple(range(n)))
