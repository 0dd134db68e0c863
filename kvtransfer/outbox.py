"""`Outbox`: the sender half of the pull transports (loopback, gRPC). `send` parks chunks under a
TransferId; the receiver's pull takes them and streams them. Unpulled sends fail at their timeout.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from pdserve.kvtransfer.transfer import TransferState, failed
from pdserve.kvtransfer.types import TransferId


@dataclass
class Parked:
    chunks: Iterable[bytes | memoryview]
    state: TransferState


class Outbox:
    def __init__(self) -> None:
        self._parked: dict[TransferId, Parked] = {}
        self._cond = threading.Condition()
        self._closed = False

    def put(self, xfer: TransferId, chunks: Iterable[bytes | memoryview], timeout_s: float) -> TransferState:
        with self._cond:
            if self._closed:
                return failed(xfer, "transport closed")
            if xfer in self._parked:
                return failed(xfer, f"transfer {xfer} is already being sent")
            state = TransferState(xfer)
            self._parked[xfer] = Parked(chunks, state)
            self._cond.notify_all()
        state.arm(timeout_s)
        state.on_end(lambda: self._drop(xfer))
        return state

    def take(self, xfer: TransferId, wait_s: float) -> Parked | None:
        """The parked send for `xfer`, waiting up to `wait_s` for it to appear; None if it does not."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or xfer in self._parked, wait_s)
            p = self._parked.get(xfer)
            if p is None or p.state.status().terminal:
                return None
            p.state.start()
            return p

    def close(self) -> None:
        with self._cond:
            self._closed = True
            parked, self._parked = list(self._parked.values()), {}
            self._cond.notify_all()
        for p in parked:
            p.state.fail("transport closed")

    def _drop(self, xfer: TransferId) -> None:
        with self._cond:
            self._parked.pop(xfer, None)


def stream(p: Parked) -> Iterator[bytes | memoryview]:
    """Yield the parked chunks while the send is live; DONE after the last, FAILED on any error.
    The consumer stops early (closing this generator) when the receiver goes away."""
    finished = False
    try:
        for c in p.chunks:
            if p.state.status().terminal:
                return
            p.state.nbytes += len(c)
            yield c
        finished = True
    except GeneratorExit:
        p.state.fail("receiver went away mid-transfer")
        raise
    except Exception as e:  # the chunk source failed (e.g. a layer never became ready)
        p.state.fail(f"sender: {type(e).__name__}: {e}")
        raise
    finally:
        if finished:
            p.state.finish()
