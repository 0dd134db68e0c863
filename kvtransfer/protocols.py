"""The seams of the KV-transfer layer: `KVCodec` (pure tensor math), `Transport` (moves chunks),
and the two ends a worker sees, `KVSource` (prefill) and `KVSink` (decode), over `BlockRefs`.

Layering (vLLM v0 kv_pipe -> connector): a codec turns one layer's token-major KV slab into parts
and back; wire.py frames parts into checksummed chunks; a transport moves chunks between two
endpoints and knows nothing of KV; KVSender/KVReceiver (sender.py, receiver.py) are the only
composites, built by factories.py. Workers depend on `KVSource`/`KVSink` only, so a rank wrapper
(or a test double) that has these methods plugs in without a cast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Protocol, Sequence, TypeVar, runtime_checkable

from pdserve.kvtransfer.types import HandleId, KVHandle, PeerAddr, TransferId, TransferStatus

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
"""Receives a transfer's chunks in order. A transport with a tensor lane (`Transport.tensor_lane`)
may instead hand it a whole decoded `wire.Frame` whose parts are already on the receiver's device."""


class Transport(Protocol):
    """Moves ordered byte chunks for one TransferId from a sender to a receiver.

    Both ends call: the sender `send`, the receiver `recv` (in either order). `peer` is an opaque
    string: on `recv` the sender's `endpoint()`, on `send` the receiver's `connect_info(...)`. The
    control message that carries them is KVSender/KVReceiver's business, not the transport's.
    """

    name: str

    def start(self) -> Transport:
        """Open what the transport listens on (a server, a store); returns self. The constructor
        opens nothing. Idempotent; KVSender/KVReceiver.start() call it for the transport they own."""
        ...

    def endpoint(self) -> str:
        """What a receiver passes as `peer` to reach this sender ("" if the transport needs none).
        Valid after `start()`."""
        ...

    def tensor_lane(self, peer: str) -> str | None:
        """How `send` to `peer` (a receiver's `connect_info`) carries `wire.TensorFrame`s as tensors:
        "gloo", "nccl" or "ipc"; None when it carries bytes only (the sender then sends wire chunks)."""
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


@runtime_checkable
class BlockRefs(Protocol):
    """The allocator view a KV source needs: reference counts on KV block ids (`engine.kv_cache.BlockAllocator`,
    or a rank's recording wrapper). `fork` adds one reference per id, `free` drops one; a block is
    reused once its count reaches 0. Both are called only from the step-loop thread."""

    def fork(self, block_ids: Sequence[int]) -> None: ...

    def free(self, block_ids: Sequence[int]) -> None: ...


@runtime_checkable
class KVSource(Protocol):
    """The prefill end of transfers (`KVSender`, and rank wrappers of it). Every method runs on the
    worker's step-loop thread and never blocks on the network."""

    @property
    def addresses(self) -> list[PeerAddr]:
        """Where receivers reach this source: one entry per rank whose KV it exports."""
        ...

    def export(self, request_id: str, block_ids: list[int], num_tokens: int, *, handle_id: str | None = None,
               streaming: bool = False, prefill_s: float | None = None) -> KVHandle:
        """Pin `block_ids` (they hold `num_tokens` tokens' KV, in token order) for receivers to pull.
        `streaming=True`: exported before the forward that writes them; layer i is pullable after
        `layer_hook(i)` or `mark_ready`. Returns the handle the router passes to decode."""
        ...

    def layer_hook(self, layer: int) -> None:
        """The forward has written global `layer` of every streaming export (runner callback)."""
        ...

    def mark_ready(self, handle_id: str) -> None:
        """Every layer of `handle_id` is in the pool (a streaming export whose forward ended)."""
        ...

    def release(self, handle_id: str) -> None:
        """Nobody will pull `handle_id` (the request ended at prefill); its blocks free at `poll`."""
        ...

    def poll(self) -> list[HandleId]:
        """Free the blocks of exports released by every receiver or past their lease; returns them."""
        ...

    def close(self) -> None:
        """Stop serving, cancel sends, close the transport. Idempotent."""
        ...


XferKey = TypeVar("XferKey", bound=Hashable)


@runtime_checkable
class KVSink(Protocol[XferKey]):
    """The decode end of transfers (`KVReceiver` is a `KVSink[TransferId]`; a rank wrapper that keys
    pulls by its own counter is a `KVSink[int]`). Never blocks on the network."""

    def pull(self, handle: KVHandle, dst_block_ids: Sequence[int], first_token: int = 0) -> XferKey:
        """Start moving `handle`'s KV into `dst_block_ids` (allocated and owned by the caller, enough
        for `handle.num_tokens`; token t lands in dst_block_ids[t // block_size]). With `first_token`
        > 0 only tokens [first_token, num_tokens) travel: the caller already holds the prefix there
        (a prefix-cache hit), the delta transfer. Remote trouble is a FAILED transfer, never an exception."""
        ...

    def poll(self, xfer: XferKey) -> tuple[TransferStatus, str | None]:
        """(status, error); error is set once FAILED. An unknown id is FAILED."""
        ...

    def ended_s(self, xfer: XferKey) -> float | None:
        """time.monotonic() when `xfer` became terminal; None while it runs."""
        ...

    def nbytes(self, xfer: XferKey) -> int:
        """Bytes received for `xfer` so far (codec output plus framing)."""
        ...

    def abort(self, xfer: XferKey) -> None:
        """FAILED("aborted") unless terminal; once it returns nothing writes the destination blocks."""
        ...

    def close(self) -> None:
        """Abort every transfer and close the transport. Idempotent."""
        ...
