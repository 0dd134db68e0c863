"""StepLoop: the thread that owns a worker. Calls run on it between steps; a step that raises
fails every pending and later call, reports itself through check(), and calls on_death once."""

from __future__ import annotations

import threading

import pytest

from pdserve.runtime.step_loop import StepLoop


class _Worker:
    """Steps only while it has work; records which thread ran it."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.threads: set[str] = set()
        self.fail = False

    def step(self) -> list[int]:
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("forward pass failed")
        out, self.pending = self.pending, []
        return out

    def has_work(self) -> bool:
        return bool(self.pending) or self.fail

    def add(self, *items: int) -> int:
        self.threads.add(threading.current_thread().name)
        self.pending.extend(items)
        return len(self.pending)


def test_calls_run_on_the_step_thread_and_outputs_are_delivered() -> None:
    w, delivered, done = _Worker(), [], threading.Event()
    loop = StepLoop(w.step, w.has_work, lambda outs: (delivered.extend(outs), done.set()))
    loop.start()
    try:
        assert loop.submit(w.add, 1, 2).result(timeout=10) == 2
        assert done.wait(timeout=10)
        assert delivered == [1, 2]
        assert w.threads == {"pdserve-step"}  # the caller's thread never touched the worker
        with pytest.raises(ValueError):  # a call's exception goes to its caller; the loop lives on
            loop.submit(int, "not a number").result(timeout=10)
        loop.check()
        assert loop.submit(w.add, 4).result(timeout=10) == 1
    finally:
        loop.stop()
    with pytest.raises(RuntimeError, match="not running"):
        loop.check()


def test_a_step_that_raises_fails_every_call_and_calls_on_death() -> None:
    w, died = _Worker(), threading.Event()
    loop = StepLoop(w.step, w.has_work, lambda outs: None, on_death=died.set)
    loop.start()
    loop.submit(setattr, w, "fail", True).result(timeout=10)
    assert died.wait(timeout=10)
    with pytest.raises(RuntimeError, match="forward pass failed"):
        loop.check()
    with pytest.raises(RuntimeError, match="step loop died"):
        loop.submit(w.add, 3).result(timeout=10)
    loop.stop()
