"""`PullTransport`: what the two pull transports (loopback, gRPC) share. The sender parks a send's
chunks in its `Outbox`; the receiver runs one thread per transfer that fetches them from the
sender's outbox and hands them to the sink (`_pull`, each transport's own).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from pdserve.kvtransfer.outbox import Outbox
from pdserve.kvtransfer.protocols import ChunkSink
from pdserve.kvtransfer.transfer import TransferState, failed
from pdserve.kvtransfer.types import TransferId


class PullTransport(ABC):
    name = "pull"

    def __init__(self) -> None:
        self._outbox = Outbox()
        self._closed = False
        self._recvs: dict[TransferId, TransferState] = {}
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def connect_info(self, peer: str) -> str:
        return ""  # the receiver dials the sender's endpoint; nothing to tell it

    def tensor_lane(self, peer: str) -> str | None:
        return None  # bytes only

    def recv(self, xfer: TransferId, peer: str, sink: ChunkSink, timeout_s: float) -> TransferState:
        with self._lock:
            if self._closed:
                return failed(xfer, "transport closed")
            state = TransferState(xfer)
            self._recvs[xfer] = state
            t = threading.Thread(target=self._run_pull, args=(state, peer, sink, timeout_s), daemon=True,
                                 name=f"{self.name}-recv-{xfer}")
            self._threads.add(t)
        state.on_end(lambda: self._forget(xfer))
        state.arm(timeout_s)
        t.start()
        return state

    def _run_pull(self, state: TransferState, peer: str, sink: ChunkSink, timeout_s: float) -> None:
        try:
            self._pull(state, peer, sink, timeout_s)
        except Exception as e:  # noqa: BLE001 - a dead receive thread must fail its transfer now, not at its timeout
            state.fail(f"{self.name} receive failed: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    @abstractmethod
    def _pull(self, state: TransferState, peer: str, sink: ChunkSink, timeout_s: float) -> None:
        """On the receive thread: fetch `peer`'s chunks for `state` into `sink` until done or ended."""

    def _forget(self, xfer: TransferId) -> None:
        with self._lock:
            self._recvs.pop(xfer, None)

    def _close_receives(self) -> list[threading.Thread] | None:
        """Mark closed, close the outbox and fail every running receive (their threads leave the
        stream); returns those threads, or None if already closed."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            recvs, threads = list(self._recvs.values()), list(self._threads)
        for s in recvs:
            s.fail("transport closed")
        self._outbox.close()
        return threads
