"""One rank of a 2-rank lock-step instance over a fake worker, for tests/test_lockstep_exit.py:
`python -m tests.lockstep_exit_rank RANK INIT_METHOD LINGER_S`. It steps one request through the
instance, then lets its interpreter exit normally after LINGER_S (a finalizer that sleeps holds it
in finalization a little, as a real process's teardown does). A guard registered first runs last at
exit and fails the process (status 3) if the step thread is still alive."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any


@atexit.register  # registered before pdserve is imported: runs after its exit hooks
def _guard() -> None:
    left = [t.name for t in threading.enumerate() if t.name.startswith("pdserve-step") and t.is_alive()]
    if left:
        print("threads left at exit:", left, file=sys.stderr, flush=True)
        os._exit(3)


class _SlowFinalizer:
    def __del__(self) -> None:
        time.sleep(1.0)


class _Worker:
    engine = SimpleNamespace(allocator=SimpleNamespace(num_free=8))
    idle = False

    def __init__(self) -> None:
        self.queue: list[Any] = []

    def submit(self, x: Any) -> None:
        self.queue.append(x)

    def abort(self, x: Any) -> bool:
        return False

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[Any]:
        out, self.queue = self.queue, []
        return out


def main(rank: int, init_method: str, linger_s: float) -> None:
    from pdserve.engine.pipeline import RankLayout
    from pdserve.engine.tp import init_process_group
    from pdserve.runtime.lockstep import LockStep, make_step_loop

    init_process_group(rank, 2, init_method, "cpu")
    ls = LockStep(_Worker(), [], RankLayout(2, 1, rank))
    got: list[Any] = []
    loop = make_step_loop(ls, got.extend)
    loop.start()
    if rank == 0:
        loop.submit(ls.submit, "a").result(30)
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == ["a"], got
    time.sleep(linger_s)
    print(f"rank {rank} exits", flush=True)


_slow = _SlowFinalizer()
if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
