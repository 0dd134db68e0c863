"""The lengths file: a workload reduced to its token lengths, shared by `pdserve bench` and `pdserve plan`.

Format: UTF-8 JSON lines, one request per line, in arrival order:

    {"prompt_len": 612, "output_len": 187}

`prompt_len` >= 1 is the prompt's length in tokens of the served model's tokenizer (without
special tokens the server may add); `output_len` >= 1 is the number of tokens the request
generates (sent as `max_tokens` with `ignore_eos`). Other keys on a line are ignored, blank
lines are skipped, and a malformed line is a `ValueError` naming the file and line number.

`read_lengths` also takes the two other shapes lengths come in: a JSON list of such objects or of
`[prompt_len, output_len]` pairs (a file starting with `[`), and CSV with those two columns
(a `.csv` file). It is the one reader of lengths: `pdserve plan` reads through it too.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RequestLengths:
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


def write_lengths(path: str | Path, items: Iterable[RequestLengths]) -> int:
    """Write one JSON line per request; returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"prompt_len": item.prompt_len, "output_len": item.output_len}) + "\n")
            n += 1
    return n


def read_lengths(path: str | Path) -> list[RequestLengths]:
    """The requests of a lengths file (JSON lines, a JSON list or CSV, see above), in file order;
    `ValueError` naming the file and the line (or entry) of a malformed request."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return [_lengths(f"{path}:{n}", row) for n, row in enumerate(csv.DictReader(text.splitlines()), 2)]
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not a JSON list of lengths ({e})") from None
        return [_lengths(f"{path}: entry {n}", row) for n, row in enumerate(entries, 1)]
    return [_lengths(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _lengths(where: str, raw: object) -> RequestLengths:
    """One request from a JSON line, a parsed JSON object or [prompt_len, output_len] pair, or a CSV
    row (its numbers still text)."""
    try:
        row = json.loads(raw) if isinstance(raw, str) else raw
        pair = (row["prompt_len"], row["output_len"]) if isinstance(row, dict) else tuple(row)
        if len(pair) != 2:
            raise ValueError(f"want 2 lengths, got {len(pair)}")
        return RequestLengths(*(int(v) if isinstance(v, str) else v for v in pair))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a lengths line ({e})") from None
