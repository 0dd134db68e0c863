"""Chat sessions as a lengths file (bench/lengths.py, the planner's input): one line per turn,
session by session, turn by turn, with the session fields:

    {"prompt_len": 412, "output_len": 48, "session": 3, "turn": 1, "shared_prefix_len": 520, "think_time_s": 1.0}

`prompt_len` is the whole prompt of the turn (system prompt, history, new message, the chat
template's tokens estimated by `TEMPLATE_TOKENS_PER_MESSAGE`); `session` numbers the session (0-based)
and `turn` the turn in it (0-based). `shared_prefix_len` is the prefix every session shares: the
system prompt with its template tokens (0 without one; the history a turn shares with its session's
earlier turns is implied by the turn order). `think_time_s` is the replay's think time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.lengths import RequestLengths, write_lengths
from pdserve.bench.sessions import TEMPLATE_TOKENS_PER_MESSAGE, ChatSession


def session_trace(sessions: Sequence[ChatSession], think_time_s: float = 0.0) -> list[RequestLengths]:
    """The lengths of `sessions` (see the module docstring), in session then turn order."""
    out = []
    for i, s in enumerate(sessions):
        shared = s.system_len + TEMPLATE_TOKENS_PER_MESSAGE if s.system else 0
        out += [RequestLengths(s.prompt_len(k), turn.output_len, session=i, turn=k, shared_prefix_len=shared,
                               think_time_s=think_time_s if k else 0.0) for k, turn in enumerate(s.turns)]
    return out


def write_session_trace(path: str | Path, sessions: Sequence[ChatSession], think_time_s: float = 0.0) -> int:
    """Write the trace as a lengths file; returns the number of turns written."""
    return write_lengths(path, session_trace(sessions, think_time_s))
