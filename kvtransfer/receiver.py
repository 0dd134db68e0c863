"""`KVReceiver`: the decode end. Pulls a handle's KV into blocks the caller already allocated.

`pull` returns at once; a background thread sends the control messages and the transport's threads
decode frames straight into the destination blocks. `poll`/`abort` never block on the network.
Whatever the outcome (done, failed, aborted) the receiver tells each prefill shard to release
the region it pulled, so the router never relays anything.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from pdserve.engine.kv_cache import KVPool
from pdserve.kvtransfer import kvtransfer_pb2 as pb
from pdserve.kvtransfer import kvtransfer_pb2_grpc as pb_grpc
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.at_exit import close_at_exit, forget
from pdserve.kvtransfer.codecs import get_codec
from pdserve.kvtransfer.controller import CodecController
from pdserve.kvtransfer.options import ReceiverOptions
from pdserve.kvtransfer.protocols import Transport
from pdserve.kvtransfer.reshard import Piece, plan_pulls, scatter_slab, token_slots
from pdserve.kvtransfer.rpc import Channels
from pdserve.kvtransfer.transfer import TransferState
from pdserve.kvtransfer.types import KVHandle, Span, TransferId, TransferStatus

_KEEP_FINISHED = 1024  # terminal transfers remembered for poll()


@dataclass
class _Pull:
    state: TransferState
    handle: KVHandle
    codec: str
    first_token: int = 0  # tokens before it are not pulled (the receiver holds them)
    started_s: float = field(default_factory=time.monotonic)
    pieces: list[Piece] = field(default_factory=list)
    subs: list[TransferState] = field(default_factory=list)
    sinks: list[_FrameSink] = field(default_factory=list)
    write_lock: threading.Lock = field(default_factory=threading.Lock)  # held while writing the pool


class KVReceiver:
    """The decode end (`protocols.KVSink`). The constructor opens nothing; `start()` starts the
    transport (factories.make_receiver does both); control channels open on first use."""

    def __init__(self, pool: KVPool, transport: Transport, options: ReceiverOptions,
                 controller: CodecController | None = None) -> None:
        lay = pool.layout
        self.pool, self.transport, self.options = pool, transport, options
        self.timeout_s, self.codec, self.controller = options.timeout_s, options.codec, controller or CodecController()
        self.layers = options.layers or Span(0, lay.num_layers)
        self.heads = options.heads or Span(0, lay.num_kv_heads)
        assert len(self.layers) == lay.num_layers and len(self.heads) == lay.num_kv_heads, "spans != pool"
        self._channels = Channels(options.tls)
        self._pulls: OrderedDict[TransferId, _Pull] = OrderedDict()
        self._lock = threading.Lock()
        self._exit_token: int | None = None

    def start(self) -> KVReceiver:
        """Start the transport. Idempotent; returns self."""
        if self._exit_token is None:
            self.transport.start()
            self._exit_token = close_at_exit(self, KVReceiver.close)
        return self

    def pull(self, handle: KVHandle, dst_block_ids: Sequence[int], first_token: int = 0) -> TransferId:
        """Start moving `handle`'s KV (this rank's layers x heads) for tokens [first_token, num_tokens)
        into `dst_block_ids`, which the caller owns throughout. Never raises for remote trouble: a bad
        handle is a FAILED transfer."""
        if self._exit_token is None:
            raise RuntimeError("KVReceiver: call start() first")
        xfer = TransferId(uuid.uuid4().hex)
        codec = self.codec if self.codec != "auto" else self.controller.choose(handle, self.pool.layout)
        p = _Pull(TransferState(xfer), handle, codec, first_token)
        with self._lock:
            self._pulls[xfer] = p
            self._prune()
        error = self._check(handle, dst_block_ids, first_token)
        if error is None:
            try:
                p.pieces = plan_pulls(handle, self.layers, self.heads)
            except ValueError as e:
                error = str(e)
        if error is not None:
            p.state.fail(error)
            return xfer
        p.state.arm(self.timeout_s)
        threading.Thread(target=self._run, args=(p, list(dst_block_ids)), daemon=True,
                         name=f"kv-pull-{xfer}").start()
        return xfer

    def poll(self, xfer: TransferId) -> tuple[TransferStatus, str | None]:
        p = self._pulls.get(xfer)
        if p is None:
            return TransferStatus.FAILED, f"unknown transfer {xfer}"
        return p.state.status(), p.state.error

    def ended_s(self, xfer: TransferId) -> float | None:
        """time.monotonic() when the transfer ended (the KV landed, or it failed); None while running."""
        p = self._pulls.get(xfer)
        return p.state.ended_s if p is not None else None

    def nbytes(self, xfer: TransferId) -> int:
        """Bytes received so far (wire bytes: the codec's output plus framing)."""
        p = self._pulls.get(xfer)
        return sum(s.nbytes for s in p.subs) if p is not None else 0

    def tensor_frames(self, xfer: TransferId) -> int:
        """Frames (one per layer and piece) that arrived over the transport's tensor lane, as device
        tensors; the rest came as wire bytes. Visible per transfer, so a path that did not take the
        lane is never silent."""
        p = self._pulls.get(xfer)
        return sum(k.tensor_frames for k in p.sinks) if p is not None else 0

    def wait(self, xfer: TransferId, timeout_s: float | None = None) -> TransferStatus:
        p = self._pulls.get(xfer)
        return p.state.wait(timeout_s) if p is not None else TransferStatus.FAILED

    def abort(self, xfer: TransferId) -> None:
        """FAILED("aborted") unless already terminal. When this returns, nothing writes into the
        destination blocks any more, so the caller may free them."""
        p = self._pulls.get(xfer)
        if p is None:
            return
        p.state.fail("aborted")
        with p.write_lock:
            pass

    def close(self) -> None:
        """Abort every transfer and close the transport (the receiver owns it). Idempotent."""
        with self._lock:
            pulls = list(self._pulls.values())
        for p in pulls:
            self.abort(p.state.xfer)
        self._channels.close()
        self.transport.close()
        if self._exit_token is not None:
            forget(self._exit_token)

    # ---- background ------------------------------------------------------------------------------

    def _check(self, h: KVHandle, dst: Sequence[int], first_token: int) -> str | None:
        lay = self.pool.layout
        if h.head_dim != lay.head_dim or h.num_layers < self.layers.stop or h.num_kv_heads < self.heads.stop:
            return f"handle layout ({h.num_layers} layers, {h.num_kv_heads} kv heads, head_dim {h.head_dim}) " \
                   f"does not contain this rank's layers {self.layers} x heads {self.heads}"
        if len(dst) < lay.num_blocks_for(h.num_tokens):
            return f"{len(dst)} destination blocks cannot hold {h.num_tokens} tokens"
        if not 0 <= first_token < h.num_tokens:
            return f"first_token {first_token} is outside the handle's {h.num_tokens} tokens"
        return None

    def _run(self, p: _Pull, dst: list[int]) -> None:
        started: list[tuple[Piece, TransferId]] = []
        try:
            self._pull_pieces(p, dst, started)
        except Exception as e:  # a setup failure (TCPStore, bad handle) is this transfer's FAILED, not a dead thread
            p.state.fail(f"pull failed: {e!r}")
        finally:
            self._finish(p, started)

    def _pull_pieces(self, p: _Pull, dst: list[int], started: list[tuple[Piece, TransferId]]) -> None:
        slots = token_slots(dst, self.pool.layout.block_size, p.handle.num_tokens, self.pool.device)[p.first_token:]
        sinks = p.sinks
        for i, piece in enumerate(p.pieces):
            sub_xfer = TransferId(f"{p.state.xfer}.{i}")
            peer = piece.shard.peer.data
            info = self.transport.connect_info(peer)
            sinks.append(_FrameSink(self, p, piece, slots))
            sub = self.transport.recv(sub_xfer, peer, sinks[-1], self.timeout_s)
            p.subs.append(sub)
            p.state.on_end(lambda sub=sub: sub.cancel(p.state.error or "aborted"))
            sub.on_end(lambda sub=sub, piece=piece: _fail_with(p.state, sub, piece))  # one piece failing fails the pull now
            ack = self._control(piece, lambda stub: stub.StartPull(pb.PullRequest(
                handle_id=p.handle.handle_id, xfer_id=sub_xfer, codec=p.codec, transport_info=info,
                layers=pb.Range(start=piece.layers.start, stop=piece.layers.stop),
                heads=pb.Range(start=piece.heads.start, stop=piece.heads.stop), first_token=p.first_token)))
            started.append((piece, sub_xfer))
            if not ack.ok:
                p.state.fail(f"prefill {piece.shard.peer.control}: {ack.error}")
                break
            p.state.start()
        for sub in p.subs:
            sub.wait()
        failed = [s for s in p.subs if s.status() is TransferStatus.FAILED]
        if failed:
            p.state.fail(failed[0].error or "transfer failed")
        if any(not k.complete for k in sinks):
            p.state.fail("the stream ended before every layer arrived")
        p.state.finish()

    def _finish(self, p: _Pull, started: list[tuple[Piece, TransferId]]) -> None:
        """Tell every shard we are done with our region (and to stop sending if we failed)."""
        if p.state.status() is TransferStatus.DONE:
            self.controller.observe(sum(s.nbytes for s in p.subs), time.monotonic() - p.started_s)
        for piece, sub_xfer in started:
            if p.state.status() is TransferStatus.FAILED:
                self._control(piece, lambda stub: stub.Abort(pb.AbortRequest(xfer_id=sub_xfer)))
        for piece in p.pieces:
            self._control(piece, lambda stub: stub.Release(pb.ReleaseRequest(
                handle_id=p.handle.handle_id, layers=pb.Range(start=piece.layers.start, stop=piece.layers.stop),
                heads=pb.Range(start=piece.heads.start, stop=piece.heads.stop))))

    def _control(self, piece: Piece, call: Callable[[_TimedStub], pb.Ack]) -> pb.Ack:
        stub = pb_grpc.KVControlStub(self._channels.get(piece.shard.peer.control))
        try:
            return call(_TimedStub(stub, self.timeout_s))
        except Exception as e:  # grpc.RpcError: the prefill worker is gone; the lease frees its blocks
            return pb.Ack(ok=False, error=f"control rpc failed: {e}")

    def _prune(self) -> None:
        done = [x for x, p in self._pulls.items() if p.state.status().terminal]
        for x in done[:max(0, len(done) - _KEEP_FINISHED)]:
            del self._pulls[x]


def _fail_with(state: TransferState, sub: TransferState, piece: Piece) -> None:
    """Fail the whole pull at once when one piece's transfer (one source rank's share) failed, so the
    others are cancelled instead of waited on until the pull's timeout."""
    if sub.status() is TransferStatus.FAILED:
        state.fail(f"from {piece.shard.peer.data}: {sub.error or 'transfer failed'}")


class _TimedStub:
    """A KVControl stub whose calls all carry a deadline."""

    def __init__(self, stub: pb_grpc.KVControlStub, timeout_s: float) -> None:
        self._stub, self._timeout = stub, timeout_s

    def StartPull(self, req: pb.PullRequest) -> pb.Ack:
        return self._stub.StartPull(req, timeout=self._timeout)

    def Release(self, req: pb.ReleaseRequest) -> pb.Ack:
        return self._stub.Release(req, timeout=self._timeout)

    def Abort(self, req: pb.AbortRequest) -> pb.Ack:
        return self._stub.Abort(req, timeout=self._timeout)


class _FrameSink:
    """Chunk sink of one piece: reassembles frames, checks them against the request, decodes each
    layer into the destination blocks. Raises (failing the transfer) on anything unexpected."""

    def __init__(self, rx: KVReceiver, p: _Pull, piece: Piece, slots: torch.Tensor) -> None:
        self.rx, self.p, self.piece, self.slots = rx, p, piece, slots
        self.reader = wire.FrameReader()
        self.next_layer = piece.layers.start
        self.tensor_frames = 0  # frames that came over a tensor lane (no host bytes)

    @property
    def complete(self) -> bool:
        return self.next_layer == self.piece.layers.stop and self.reader.idle

    def __call__(self, chunk: memoryview | wire.Frame) -> None:
        """A wire chunk, or a whole frame from a tensor lane (its parts already on the pool's device)."""
        if isinstance(chunk, wire.Frame):
            if not self.reader.idle:
                raise wire.WireError("a tensor frame inside a byte frame")
            self.tensor_frames += 1
            frame: wire.Frame | None = chunk
        else:
            frame = self.reader.feed(chunk)
        if frame is None:
            return
        h, piece = self.p.handle, self.piece
        shape = (2, h.num_tokens - self.p.first_token, len(piece.heads), h.head_dim)
        if (frame.layer != self.next_layer or frame.head_start != piece.heads.start or frame.shape != shape
                or frame.codec != self.p.codec):
            raise wire.WireError(f"unexpected frame: layer {frame.layer}, heads from {frame.head_start}, "
                                 f"shape {frame.shape}, codec {frame.codec}")
        parts = [p.to(self.rx.pool.device) for p in frame.parts]  # dequantise on the pool's device
        slab = get_codec(frame.codec).decode(parts, frame.shape, frame.dtype)
        rx = self.rx
        heads = slice(piece.heads.start - rx.heads.start, piece.heads.stop - rx.heads.start)
        with self.p.write_lock:
            if self.p.state.status().terminal:
                raise wire.WireError("transfer already ended")
            scatter_slab(rx.pool, frame.layer - rx.layers.start, self.slots, heads, slab)
        self.next_layer += 1
        if self.next_layer == piece.layers.stop and not self.reader.idle:
            raise wire.WireError("trailing bytes after the last frame")
