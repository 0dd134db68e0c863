"""The two seams of the KV-transfer layer: `KVCodec` (pure tensor math) and `Transport` (moves bytes).

Layering (vLLM v0 kv_pipe -> connector): a codec turns one layer's token-major KV slab into parts
and back; wire.py frames parts into checksummed chunks; a transport moves chunks between two
endpoints and knows nothing of KV; connector.py (KVSender/KVReceiver) is the only composite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence

from pdserve.kvtransfer.types import TransferId, TransferStatus

if TYPE_CHECKING:
    import torch


class KVCodec(Protocol):
    """Turns a KV slab into the tensors that travel, and back. Pure: no I/O, no state across calls.

    A slab is one layer of one request, token-major: (2, num_tokens, num_heads, head_dim), k at 0 and
    v at 1, in the cache dtype. Token-major keeps the wire independent of either side's block size.
    """

    name: str

    def encode(self, slab: torch.Tensor) -> list[torch.Tensor]:
        """Parts to ship: contiguous tensors on the slab's device (quantisation runs there; int4_zstd's
        entropy-coded blobs and format byte are made on the host, where zstd runs). A tensor-level
        transport moves device parts as they are; the byte wire copies them to the host once.
        A slab with 0 tokens encodes to parts of 0 bytes."""
        ...

    def decode(self, parts: Sequence[torch.Tensor], shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Inverse of encode: a slab of `shape` and `dtype` on the parts' device (dequantisation runs
        there; pass the parts on the destination pool's device). Raw round-trips bit-exactly; lossy codecs
        bound the error (tests/kvtransfer/test_codecs.py). Raises ValueError on parts that do not fit."""
        ...

    def wire_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int | None:
        """Exact total bytes of encode's parts for a slab of `shape`, or None when data-dependent."""
        ...


class Transfer(Protocol):
    """One direction of one transfer as a transport sees it. Thread-safe."""

    def status(self) -> TransferStatus:
        """Current status. Never raises; a FAILED transfer has `error` set and never changes again."""
        ...

    @property
    def error(self) -> str | None: ...

    def wait(self, timeout_s: float | None = None) -> TransferStatus:
        """Block until terminal or `timeout_s` passes; returns the status then (not a timeout error)."""
        ...

    def cancel(self, reason: str = "aborted") -> None:
        """Stop at the next chunk boundary and become FAILED(reason). No-op once terminal."""
        ...


ChunkSink = Callable[[memoryview], None]


class Transport(Protocol):
    """Moves ordered byte chunks for one TransferId from a sender to a receiver.

    Both ends call: the sender `send`, the receiver `recv` (in either order). `peer` is an opaque
    string: on `recv` the sender's `endpoint()`, on `send` the receiver's `connect_info(...)`. The
    control message that carries them is the connector's business, not the transport's.
    """

    name: str

    def endpoint(self) -> str:
        """What a receiver passes as `peer` to reach this sender ("" if the transport needs none)."""
        ...

    def connect_info(self, peer: str) -> str:
        """What the sender passes as `peer` to reach this receiver for data from `peer`. May set up
        the pair's channel lazily (torch: a 2-rank group over its own TCPStore)."""
        ...

    def send(self, xfer: TransferId, chunks: Iterable[bytes | memoryview], peer: str,
             timeout_s: float) -> Transfer:
        """Deliver `chunks` in order. The iterable is consumed lazily on the transport's thread and
        may block (layer-wise streaming); an exception from it fails the transfer with its message.
        An empty iterable completes as DONE once the receiver has seen the end. FAILED if the
        receiver never shows up, goes away, or the whole transfer exceeds `timeout_s`."""
        ...

    def recv(self, xfer: TransferId, peer: str, sink: ChunkSink, timeout_s: float) -> Transfer:
        """Call `sink(chunk)` for each chunk in order, on the transport's thread; DONE after the last.
        If `sink` raises, the transfer is FAILED with its message and the sender is told to stop."""
        ...

    def close(self) -> None:
        """Fail every unfinished transfer and release sockets/threads. Idempotent; calls after close
        return transfers that are already FAILED."""
        ...
