"""The lengths file: a workload reduced to its token lengths, shared by `pdserve bench` and `pdserve plan`.

Format: UTF-8 JSON lines, one request per line, in arrival order:

    {"prompt_len": 612, "output_len": 187}
    {"prompt_len": 900, "output_len": 64, "session": "c17", "turn": 1, "shared_prefix_len": 300, "think_time_s": 2.5}

`prompt_len` >= 1 is the prompt's length in tokens of the served model's tokenizer (without
special tokens the server may add); `output_len` >= 1 is the number of tokens the request
generates (sent as `max_tokens` with `ignore_eos`). Other keys on a line are ignored, blank
lines are skipped, and a malformed line is a `ValueError` naming the file and line number.

Multi-turn sessions (optional keys; a file without them is a single-turn workload):
- `session` (str or int) and `turn` (int >= 0) come together: request `turn` of conversation
  `session`. The lines of one session appear in turn order (0, 1, 2, ...; other sessions' lines
  may interleave). `prompt_len` is the whole prompt, history included: turn k's prompt begins with
  turn k−1's prompt and its answer, so `prompt_len(k) >= prompt_len(k−1) + output_len(k−1)`.
- `shared_prefix_len` (int, 0 <= it <= prompt_len, default 0): tokens at the start of the prompt
  that every request with the same `shared_prefix_len` also starts with (e.g. one long system
  prompt); constant within a session.
- `think_time_s` (float >= 0, default 0): turn k > 0 is sent this long after turn k−1's answer
  arrived (closed loop); on turn 0 it is ignored (sessions start by the arrival process).

`read_lengths` also takes the two other shapes lengths come in: a JSON list of such objects or of
`[prompt_len, output_len]` pairs (a file starting with `[`), and CSV with those columns
(a `.csv` file; the session columns optional, empty cells = absent). It is the one reader of
lengths: `pdserve plan` reads through it too.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SESSION_KEYS = ("session", "turn", "shared_prefix_len", "think_time_s")


@dataclass(frozen=True)
class RequestLengths:
    prompt_len: int
    output_len: int
    session: str | int | None = None  # conversation id; None = a single-turn request
    turn: int | None = None  # 0-based index within `session`
    shared_prefix_len: int = 0  # leading prompt tokens shared with every request of the same value
    think_time_s: float = 0.0  # gap after the previous turn's answer (turn > 0)

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if (self.session is None) != (self.turn is None):
            raise ValueError(f"session, turn: give both or neither, got {self.session!r}, {self.turn!r}")
        if self.session is not None and not (isinstance(self.session, str) or _is_int(self.session)):
            raise ValueError(f"session: must be a string or an integer, got {self.session!r}")
        if self.turn is not None and (not _is_int(self.turn) or self.turn < 0):
            raise ValueError(f"turn: must be an integer >= 0, got {self.turn!r}")
        if not _is_int(self.shared_prefix_len) or not 0 <= self.shared_prefix_len <= self.prompt_len:
            raise ValueError(f"shared_prefix_len: must be an integer in [0, prompt_len={self.prompt_len}], "
                             f"got {self.shared_prefix_len!r}")
        t = self.think_time_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"think_time_s: must be a finite number >= 0, got {t!r}")

    def to_json(self) -> dict:
        """The JSON object of this request's line (session keys only where set)."""
        out: dict = {"prompt_len": self.prompt_len, "output_len": self.output_len}
        if self.session is not None:
            out.update(session=self.session, turn=self.turn)
        if self.shared_prefix_len:
            out["shared_prefix_len"] = self.shared_prefix_len
        if self.think_time_s:
            out["think_time_s"] = self.think_time_s
        return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_lengths(path: str | Path, items: Iterable[RequestLengths]) -> int:
    """Write one JSON line per request; returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item.to_json()) + "\n")
            n += 1
    return n


def read_lengths(path: str | Path) -> list[RequestLengths]:
    """The requests of a lengths file (JSON lines, a JSON list or CSV, see above), in file order;
    `ValueError` naming the file and the line (or entry) of a malformed request, or of a session
    turn out of order or shorter than its history."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        rows = [(f"{path}:{n}", _lengths(f"{path}:{n}", row, text_cells=True))
                for n, row in enumerate(csv.DictReader(text.splitlines()), 2)]
    elif text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not a JSON list of lengths ({e})") from None
        rows = [(f"{path}: entry {n}", _lengths(f"{path}: entry {n}", row)) for n, row in enumerate(entries, 1)]
    else:
        rows = [(f"{path}:{n}", _lengths(f"{path}:{n}", line))
                for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    check_sessions(rows)
    return [item for _, item in rows]


def check_sessions(rows: Iterable[tuple[str, RequestLengths]]) -> None:
    """Each session's turns in order 0, 1, 2, ..., each prompt holding the previous turn's prompt and
    answer, one `shared_prefix_len` per session; `ValueError` naming the offending line (`where`)."""
    last: dict[str | int, RequestLengths] = {}
    for where, item in rows:
        if item.session is None:
            continue
        prev = last.get(item.session)
        want = 0 if prev is None else prev.turn + 1
        if item.turn != want:
            raise ValueError(f"{where}: session {item.session!r} turn {item.turn}: want turn {want} "
                             "(a session's lines come in turn order, from 0)")
        if prev is not None and item.prompt_len < prev.prompt_len + prev.output_len:
            raise ValueError(f"{where}: session {item.session!r} turn {item.turn}: prompt_len {item.prompt_len} "
                             f"< previous turn's prompt + answer ({prev.prompt_len} + {prev.output_len})")
        if prev is not None and item.shared_prefix_len != prev.shared_prefix_len:
            raise ValueError(f"{where}: session {item.session!r}: shared_prefix_len changes within the session")
        last[item.session] = item


def _lengths(where: str, raw: object, text_cells: bool = False) -> RequestLengths:
    """One request from a JSON line, a parsed JSON object or [prompt_len, output_len] pair, or a CSV
    row (`text_cells`: its numbers still text, an empty cell = absent)."""
    try:
        row = json.loads(raw) if isinstance(raw, str) else raw
        if not isinstance(row, dict):
            pair = tuple(row)
            if len(pair) != 2:
                raise ValueError(f"want 2 lengths, got {len(pair)}")
            row = {"prompt_len": pair[0], "output_len": pair[1]}
        fields = {k: row[k] for k in ("prompt_len", "output_len") + SESSION_KEYS if row.get(k) not in (None, "")}
        fields = {k: _cell(k, v) if isinstance(v, str) and (text_cells or k.endswith("_len")) else v
                  for k, v in fields.items()}
        return RequestLengths(**fields)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a lengths line ({e})") from None


def _cell(key: str, text: str) -> str | int | float:
    """A CSV cell as the field's type (a session id stays text)."""
    if key == "session":
        return text
    return float(text) if key == "think_time_s" else int(text)
