"""StepLoop: runs a worker's `step()` in a thread and hands results to asyncio callers.

Both role actors use it. The step thread owns the worker: callers never touch it directly but
`submit()` a function that the thread runs between two steps, and await the returned future. So
the actor's event loop never blocks behind a forward pass, and the worker needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

from pdserve.kvtransfer.at_exit import close_at_exit, forget

T = TypeVar("T")
log = logging.getLogger(__name__)


class StepLoop:
    def __init__(self, step: Callable[[], list[Any]], has_work: Callable[[], bool],
                 deliver: Callable[[list[Any]], None], idle_poll_s: float = 0.01,
                 stopped: Callable[[], bool] = lambda: False, on_death: Callable[[], None] | None = None) -> None:
        """`stopped`: the loop ends once it returns True (a lock-step follower whose instance stopped).
        `on_death`: called if a step raises, after every pending call has failed (actors exit, so
        Ray restarts them and the router fails their requests over)."""
        self._step, self._has_work, self._deliver, self._stopped = step, has_work, deliver, stopped
        self._on_death = on_death
        self._idle_poll_s = idle_poll_s
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pdserve-step", daemon=True)
        self.error: BaseException | None = None
        self._exit_token = -1

    def start(self) -> None:
        self._thread.start()
        self._exit_token = close_at_exit(self, StepLoop.stop)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on the step thread before its next step; the future holds result or exception."""
        fut: Future[T] = Future()
        if self.error is not None:
            fut.set_exception(RuntimeError(f"step loop died: {self.error!r}"))
            return fut
        self._inbox.put((lambda: fn(*args), fut))
        return fut

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def _drain(self, block: bool) -> bool:
        """Run queued calls; False once stop() was requested."""
        try:
            item = self._inbox.get(timeout=self._idle_poll_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # handed to the caller, e.g. ValueError for a bad request
                    fut.set_exception(e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _run(self) -> None:
        try:
            while not self._stopped() and self._drain(block=not self._has_work()):
                outputs = self._step()  # an idle step still lets transfers and leases progress
                if outputs:
                    self._deliver(outputs)
        except BaseException as e:  # reported by check(), i.e. the actor's check_health()
            log.exception("step loop died")
            self.error = e
            self._fail_pending()
            if self._on_death is not None:
                self._on_death()

    def _fail_pending(self) -> None:
        """No call may wait forever on a loop that will never run it."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(RuntimeError(f"step loop died: {self.error!r}"))

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"step loop died: {self.error!r}")
        if not self._thread.is_alive():
            raise RuntimeError("step loop is not running")

    def stop(self) -> None:
        """Finish the current step and end the thread (also at interpreter exit: a step is native code)."""
        self._inbox.put(None)
        self._thread.join(timeout=10)
        forget(self._exit_token)


def deliver_threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Schedule `fn(*args)` on `loop` from another thread; a closed loop (shutdown) drops it."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the event loop is closed: the actor is shutting down and nobody awaits this anymore
