"""`LoopbackTransport`: in-process pull transport for tests and single-process runs.

Endpoints are names in a `LoopbackHub` shared by both ends (the factories use one hub per process;
tests may pass their own). The receiver's thread takes the sender's parked chunks and hands them
to its sink, so both sides see the same failures a network transport would produce.
"""

from __future__ import annotations

import threading
import uuid
from typing import Iterable

from pdserve.kvtransfer.outbox import Outbox, stream
from pdserve.kvtransfer.protocols import ChunkSink
from pdserve.kvtransfer.pull_transport import PullTransport
from pdserve.kvtransfer.transfer import TransferState
from pdserve.kvtransfer.types import TransferId, TransferStatus


class LoopbackHub:
    def __init__(self) -> None:
        self._outboxes: dict[str, Outbox] = {}
        self._lock = threading.Lock()

    def register(self, outbox: Outbox) -> str:
        name = f"loopback:{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._outboxes[name] = outbox
        return name

    def unregister(self, name: str) -> None:
        with self._lock:
            self._outboxes.pop(name, None)

    def lookup(self, name: str) -> Outbox | None:
        with self._lock:
            return self._outboxes.get(name)


PROCESS_HUB = LoopbackHub()  # endpoints are unique names, so sharing it across tests is harmless


class LoopbackTransport(PullTransport):
    name = "loopback"

    def __init__(self, hub: LoopbackHub = PROCESS_HUB) -> None:
        super().__init__()
        self.hub = hub
        self._endpoint = ""

    def start(self) -> LoopbackTransport:
        """Register this end's outbox in the hub (its endpoint). Idempotent."""
        if not self._endpoint:
            self._endpoint = self.hub.register(self._outbox)
        return self

    def endpoint(self) -> str:
        return self._endpoint

    def send(self, xfer: TransferId, chunks: Iterable[bytes | memoryview], peer: str,
             timeout_s: float) -> TransferState:
        return self._outbox.put(xfer, chunks, timeout_s)

    def _pull(self, state: TransferState, peer: str, sink: ChunkSink, timeout_s: float) -> None:
        outbox = self.hub.lookup(peer)
        # Wait a little past the transfer's own deadline, so a sender that never shows up is the
        # armed timer's "timed out" rather than a race between the two clocks.
        parked = outbox.take(state.xfer, timeout_s + 0.25) if outbox is not None else None
        if parked is None:
            state.fail(f"peer {peer} has no transfer {state.xfer} (closed or never sent)")
            return
        state.start()
        state.on_end(lambda: parked.state.fail(state.error or "receiver done"))
        chunks = stream(parked)
        try:
            for c in chunks:
                if state.status().terminal:
                    break
                state.nbytes += len(c)
                sink(memoryview(c))
        except Exception as e:  # the sink rejected a chunk (corruption) or the source failed
            sender_error = parked.state.error if parked.state.status() is TransferStatus.FAILED else None
            state.fail(sender_error or f"{type(e).__name__}: {e}")
        finally:
            chunks.close()
        if parked.state.status() is TransferStatus.FAILED:
            state.fail(parked.state.error or "sender failed")
        state.finish()

    def close(self) -> None:
        if self._close_receives() is not None and self._endpoint:
            self.hub.unregister(self._endpoint)
