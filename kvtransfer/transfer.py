"""`TransferState`: the one concrete `Transfer` every transport and the receiver hand out.

Status moves PENDING -> IN_FLIGHT -> DONE | FAILED and never leaves a terminal state; the first
terminal write wins, so a late chunk cannot turn a cancelled transfer into DONE.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from pdserve.kvtransfer.types import TransferId, TransferStatus


class TransferState:
    def __init__(self, xfer: TransferId) -> None:
        self.xfer = xfer
        self._status = TransferStatus.PENDING
        self._error: str | None = None
        self._cond = threading.Condition()
        self._on_end: list[Callable[[], None]] = []
        self._timer: threading.Timer | None = None
        self.nbytes = 0  # bytes moved so far (chunk prefixes included)
        self.ended_s: float | None = None  # time.monotonic() when it became terminal

    def status(self) -> TransferStatus:
        return self._status

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def cancelled(self) -> bool:
        return self._status is TransferStatus.FAILED

    def start(self) -> None:
        with self._cond:
            if self._status is TransferStatus.PENDING:
                self._status = TransferStatus.IN_FLIGHT

    def finish(self) -> bool:
        """DONE unless already terminal; True if this call made it DONE."""
        return self._end(TransferStatus.DONE, None)

    def fail(self, error: str) -> bool:
        return self._end(TransferStatus.FAILED, error)

    def cancel(self, reason: str = "aborted") -> None:
        self.fail(reason)

    def arm(self, timeout_s: float) -> None:
        """Fail with a timeout unless terminal within `timeout_s`."""
        self._timer = threading.Timer(timeout_s, self.fail, (f"timed out after {timeout_s:g} s",))
        self._timer.daemon = True
        self._timer.start()

    def on_end(self, fn: Callable[[], None]) -> None:
        """Run `fn` once the transfer is terminal (at once if it already is); how waiters get unblocked."""
        with self._cond:
            if not self._status.terminal:
                self._on_end.append(fn)
                return
        fn()

    def wait(self, timeout_s: float | None = None) -> TransferStatus:
        with self._cond:
            self._cond.wait_for(lambda: self._status.terminal, timeout_s)
            return self._status

    def _end(self, status: TransferStatus, error: str | None) -> bool:
        with self._cond:
            if self._status.terminal:
                return False
            self._status, self._error = status, error
            self.ended_s = time.monotonic()
            self._cond.notify_all()
            callbacks, self._on_end = self._on_end, []
        if self._timer is not None:
            self._timer.cancel()
        for fn in callbacks:
            fn()
        return True

    def __repr__(self) -> str:
        return f"TransferState({self.xfer!r}, {self._status.value}, error={self._error!r})"


def failed(xfer: TransferId, error: str) -> TransferState:
    """A transfer that is FAILED from the start (after close, or on a bad argument)."""
    t = TransferState(xfer)
    t.fail(error)
    return t
