"""StepLog: the engine's most recent steps, numbered since start, for an in-situ latency profile.

The placement latency model is fitted to forwards timed in isolation (`pdserve profile`); the steps
an engine runs while serving are the same forwards under the real conditions (the other engines of
the host busy, the step loop's own threads, the host's state at the time). Recording them costs one
small record per step; a bounded deque keeps memory flat on a long-running server.
"""

from __future__ import annotations

from collections import deque

from pdserve.types import StepRecord


class StepLog:
    def __init__(self, capacity: int = 65536) -> None:
        self._records: deque[StepRecord] = deque(maxlen=capacity)
        self.total = 0  # steps recorded since start, including those the deque has dropped

    def append(self, record: StepRecord) -> None:
        self._records.append(record)
        self.total += 1

    def since(self, index: int) -> tuple[int, list[StepRecord]]:
        """Records numbered `index` onwards that are still held, and the number of the first of them
        (larger than `index` when older ones were dropped). Poll with the returned number plus the count."""
        first = self.total - len(self._records)
        skip = max(0, index - first)
        return first + skip, list(self._records)[skip:]
