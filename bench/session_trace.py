"""Chat sessions as a lengths file (bench/lengths.py): one line per turn, session by session, turn
by turn, with the session fields the planner reads to model prefix reuse:

    {"prompt_len": 412, "output_len": 48, "session": 3, "turn": 1, "shared_prefix_len": 262}

`prompt_len` is the whole prompt of the turn (system prompt, history, new message, the chat
template's tokens estimated by `TEMPLATE_TOKENS_PER_MESSAGE`); `session` numbers the session (0-based)
and `turn` the turn in it (0-based); `shared_prefix_len` is how many leading prompt tokens an earlier
request of the trace already held as prompt or answer: for a later turn the previous turn's prompt
and answer, for a first turn the shared system prompt (0 without one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.sessions import TEMPLATE_TOKENS_PER_MESSAGE, ChatSession


def session_trace(sessions: Sequence[ChatSession]) -> list[dict[str, int]]:
    """The lengths-file lines of `sessions` (see the module docstring), in session then turn order."""
    out = []
    for i, s in enumerate(sessions):
        for k, turn in enumerate(s.turns):
            shared = (s.prompt_len(k) - s.new_len(k) if k else
                      s.system_len + TEMPLATE_TOKENS_PER_MESSAGE if s.system else 0)
            out.append({"prompt_len": s.prompt_len(k), "output_len": turn.output_len, "session": i, "turn": k,
                        "shared_prefix_len": shared})
    return out


def write_session_trace(path: str | Path, sessions: Sequence[ChatSession]) -> int:
    """Write the trace as JSON lines; returns the number of turns written."""
    lines = session_trace(sessions)
    Path(path).write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return len(lines)
