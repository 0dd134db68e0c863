"""`FaultyTransport`: explicit fault injection into the KV data path, for `pdserve chaos` and tests.

It wraps any `Transport` (composition: nothing in the production path changes, and a deployment
that does not build one pays nothing) and applies one `KVFault` to the chunks of every send: the
chunk at `chunk_index` is dropped, corrupted (one byte flipped), delayed, truncated (half of it
sent), or the stream stalls there (the source blocks until `stall_s` or close: a transport that
stops moving). The receiver must turn each into a FAILED transfer (checksums, framing, its
timeout), or, for a delay, a late DONE; never into wrong KV.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

from pdserve.kvtransfer.protocols import ChunkSink, Transport
from pdserve.kvtransfer.transfer import TransferState
from pdserve.kvtransfer.types import TransferId

FaultKind = Literal["drop", "corrupt", "delay", "truncate", "stall"]
FAULT_KINDS: tuple[FaultKind, ...] = ("drop", "corrupt", "delay", "truncate", "stall")


@dataclass(frozen=True, kw_only=True)
class KVFault:
    kind: FaultKind
    chunk_index: int = 0
    """Which chunk of each send the fault hits (0: the first; a send with fewer chunks is untouched)."""
    delay_s: float = 0.5
    stall_s: float = 120.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind: one of {list(FAULT_KINDS)}, got {self.kind!r}")
        if self.chunk_index < 0:
            raise ValueError(f"chunk_index: must be >= 0, got {self.chunk_index}")


class FaultyTransport:
    def __init__(self, inner: Transport, fault: KVFault) -> None:
        self.inner, self.fault = inner, fault
        self.name = inner.name
        self.num_faults = 0  # sends the fault hit
        self._closed = threading.Event()

    def start(self) -> FaultyTransport:
        self.inner.start()
        return self

    def endpoint(self) -> str:
        return self.inner.endpoint()

    def tensor_lane(self, peer: str) -> str | None:
        return None  # faults hit wire chunks: the sender sends bytes even where the inner transport has a lane

    def connect_info(self, peer: str) -> str:
        return self.inner.connect_info(peer)

    def send(self, xfer: TransferId, chunks: Iterable[bytes | memoryview], peer: str,
             timeout_s: float) -> TransferState:
        return self.inner.send(xfer, self._inject(chunks), peer, timeout_s)  # type: ignore[return-value]

    def recv(self, xfer: TransferId, peer: str, sink: ChunkSink, timeout_s: float) -> TransferState:
        return self.inner.recv(xfer, peer, sink, timeout_s)  # type: ignore[return-value]

    def close(self) -> None:
        self._closed.set()
        self.inner.close()

    def _inject(self, chunks: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        f = self.fault
        for i, c in enumerate(chunks):
            if i != f.chunk_index:
                yield c
                continue
            self.num_faults += 1
            if f.kind == "drop":
                continue
            if f.kind == "corrupt":
                b = bytearray(c)
                b[len(b) // 2] ^= 0xFF
                yield bytes(b)
            elif f.kind == "truncate":
                yield bytes(c)[: len(c) // 2]
            elif f.kind == "delay":
                time.sleep(f.delay_s)
                yield c
            else:  # stall: nothing more moves until the send is given up on
                self._closed.wait(f.stall_s)
                return
