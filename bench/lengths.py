"""The lengths file: a workload reduced to its token lengths, shared by `pdserve bench` and `pdserve plan`.

Format: UTF-8 JSON lines, one request per line, in arrival order:

    {"prompt_len": 612, "output_len": 187}

`prompt_len` >= 1 is the prompt's length in tokens of the served model's tokenizer (without
special tokens the server may add); `output_len` >= 1 is the number of tokens the request
generates (sent as `max_tokens` with `ignore_eos`). Other keys on a line are ignored, blank
lines are skipped, and a malformed line is a `ValueError` naming the file and line number.
"""

from __future__ import annotations

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
    out: list[RequestLengths] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(RequestLengths(row["prompt_len"], row["output_len"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a lengths line ({e})") from e
    return out
