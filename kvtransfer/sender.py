"""`KVSender`: the prefill end. Pins exported blocks, serves pulls over the transport, frees on release.

Threads: `export`, `layer_hook`, `mark_ready` and `poll` run on the worker's step-loop thread and
are the only callers of the allocator. Control RPCs (StartPull/Release/Abort) and the transport's
threads only read the pool and queue frees, which `poll()` applies.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc

from pdserve.engine.kv_cache import KVPool
from pdserve.kvtransfer import kvtransfer_pb2 as pb
from pdserve.kvtransfer import kvtransfer_pb2_grpc as pb_grpc
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.at_exit import close_at_exit, forget
from pdserve.kvtransfer.codecs import get_codec
from pdserve.kvtransfer.options import SenderOptions
from pdserve.kvtransfer.protocols import BlockRefs, KVCodec, Transport
from pdserve.kvtransfer.reshard import gather_slab, token_slots
from pdserve.kvtransfer.rpc import RpcServer, start_server
from pdserve.kvtransfer.staging import HostStager, LayerEvents
from pdserve.kvtransfer.transfer import TransferState
from pdserve.kvtransfer.types import HandleId, KVHandle, KVShard, PeerAddr, Span, TransferId


@dataclass
class _Export:
    handle: KVHandle
    shard: KVShard
    deadline: float  # lease: freed at poll() after this, unless a send is active
    ready_layers: int  # local layers [0, ready_layers) are in the pool
    cells_left: set[tuple[int, int]]  # (layer, head) not yet released by any receiver
    sends: dict[TransferId, TransferState] = field(default_factory=dict)


@dataclass(frozen=True)
class _Pick:
    """What one send reads (global spans), how it encodes, and whether frames travel as tensors."""

    layers: Span
    heads: Span
    codec: KVCodec
    tensors: bool
    first_token: int = 0  # send tokens [first_token, num_tokens)


class KVSender:
    """The prefill end (`protocols.KVSource`). The constructor opens nothing; `start()` starts the
    transport and the control service (factories.make_sender does both)."""

    def __init__(self, pool: KVPool, allocator: BlockRefs, transport: Transport, options: SenderOptions,
                 clock: Callable[[], float] = time.monotonic) -> None:
        lay = pool.layout
        self.pool, self.allocator, self.transport, self.options = pool, allocator, transport, options
        self.lease_s, self.timeout_s, self.clock = options.lease_s, options.timeout_s, clock
        self.layers = options.layers or Span(0, lay.num_layers)
        self.heads = options.heads or Span(0, lay.num_kv_heads)
        assert len(self.layers) == lay.num_layers and len(self.heads) == lay.num_kv_heads, "spans != pool"
        self.total_layers = options.model_layers or self.layers.stop
        self.total_heads = options.model_heads or self.heads.stop
        self._exports: dict[HandleId, _Export] = {}
        self._cond = threading.Condition()
        # CUDA: gather/encode/D2H on a side stream after the layer's event, into pinned memory
        self._events, self._stager = LayerEvents(pool.device, lay.num_layers), HostStager(pool.device)
        self._server: RpcServer | None = None
        self._address: PeerAddr | None = None
        self._exit_token: int | None = None

    def start(self) -> KVSender:
        """Start the transport and serve the control RPCs on `options.listen`. Idempotent; returns self."""
        if self._server is None:
            try:
                self.transport.start()
                self._server, control = start_server(self.options.listen, self.options.tls, [
                    (pb_grpc.add_KVControlServicer_to_server, _ControlService(self))])
            except BaseException:  # no port, unreadable TLS files: leave nothing half-open
                self.transport.close()
                raise
            self._address = PeerAddr(control=control, data=self.transport.endpoint())
            self._exit_token = close_at_exit(self, KVSender.close)
        return self

    @property
    def address(self) -> PeerAddr:
        """Where receivers reach this sender (after `start()`)."""
        if self._address is None:
            raise RuntimeError("KVSender: call start() first")
        return self._address

    @property
    def addresses(self) -> list[PeerAddr]:
        return [self.address]

    def with_model_shape(self, num_layers: int, num_kv_heads: int) -> KVSender:
        """Declare the whole model's size when this rank holds only a shard of it (TP/PP); the same as
        `SenderOptions.model_layers`/`model_heads`."""
        self.total_layers, self.total_heads = num_layers, num_kv_heads
        return self

    # ---- step-loop side ----------------------------------------------------------------------

    def export(self, request_id: str, block_ids: list[int], num_tokens: int, *, handle_id: str | None = None,
               streaming: bool = False, prefill_s: float | None = None) -> KVHandle:
        """Pin `block_ids` (an extra allocator reference) until released or the lease expires.
        `streaming=True` exports before the forward pass that writes them: layer i becomes pullable
        at `layer_hook(i)` (or `mark_ready`). Ranks of one TP/PP instance pass the same handle_id."""
        lay = self.pool.layout
        assert len(block_ids) == lay.num_blocks_for(num_tokens), "block_ids must cover num_tokens exactly"
        self.allocator.fork(block_ids)
        shard = KVShard(self.address, self.layers, self.heads, tuple(block_ids))
        handle = KVHandle(HandleId(handle_id or uuid.uuid4().hex), request_id, num_tokens, self.total_layers,
                          self.total_heads, lay.head_dim, lay.block_size, lay.dtype, (shard,), prefill_s)
        cells = {(layer, h) for layer in range(self.layers.start, self.layers.stop)
                 for h in range(self.heads.start, self.heads.stop)}
        with self._cond:
            assert handle.handle_id not in self._exports, f"handle {handle.handle_id} exported twice"
            self._exports[handle.handle_id] = _Export(handle, shard, self.clock() + self.lease_s,
                                                      0 if streaming else lay.num_layers, cells)
        return handle

    def layer_hook(self, layer: int) -> None:
        """Runner callback: global `layer` is written for every streaming export in this forward."""
        local = layer - self.layers.start + 1
        self._events.record(local - 1)
        with self._cond:
            for e in self._exports.values():
                e.ready_layers = max(e.ready_layers, local)
            self._cond.notify_all()

    def mark_ready(self, handle_id: str) -> None:
        with self._cond:
            e = self._exports.get(HandleId(handle_id))
            if e is not None:
                e.ready_layers = self.pool.layout.num_layers
                self._cond.notify_all()

    def release(self, handle_id: str) -> None:
        """Drop the export now (e.g. the request ended at its first token); blocks free at poll()."""
        with self._cond:
            e = self._exports.get(HandleId(handle_id))
            if e is not None:
                e.cells_left.clear()

    def poll(self) -> list[HandleId]:
        """Free the blocks of exports that are fully released or whose lease expired (and that no
        send is reading). Call from the thread that owns the allocator; never blocks."""
        now = self.clock()
        with self._cond:
            done = [hid for hid, e in self._exports.items()
                    if not e.sends and (not e.cells_left or now > e.deadline)]
            freed = [self._exports.pop(hid) for hid in done]
        for e in freed:
            self.allocator.free(e.shard.block_ids)
        return done

    @property
    def num_exports(self) -> int:
        return len(self._exports)

    def close(self) -> None:
        """Stop serving and close the transport (the sender owns it); cancels sends. Pinned blocks are
        freed by the next poll() (or die with the pool). Idempotent."""
        with self._cond:
            sends = [s for e in self._exports.values() for s in e.sends.values()]
            for e in self._exports.values():
                e.cells_left.clear()
        for s in sends:
            s.cancel("sender closed")
        if self._server is not None:
            self._server.stop(grace=None).wait(5.0)
        self.transport.close()
        if self._exit_token is not None:
            forget(self._exit_token)

    # ---- control side (gRPC threads) -----------------------------------------------------------

    def start_pull(self, req: pb.PullRequest) -> str | None:
        """Begin sending; returns an error string instead of raising."""
        layers, heads = Span(req.layers.start, req.layers.stop), Span(req.heads.start, req.heads.stop)
        with self._cond:
            e = self._exports.get(HandleId(req.handle_id))
            if e is None:
                return f"handle {req.handle_id} is not exported here (released or lease expired)"
            if layers.intersect(self.layers) != layers or heads.intersect(self.heads) != heads:
                return "requested span is outside this shard"
            try:
                codec = get_codec(req.codec)
                lane = self.transport.tensor_lane(req.transport_info)
            except ValueError as err:
                return str(err)
            xfer = TransferId(req.xfer_id)
            if not 0 <= req.first_token < e.handle.num_tokens:
                return f"first_token {req.first_token} is outside the handle's {e.handle.num_tokens} tokens"
            frames = self._frames(e, xfer, _Pick(layers, heads, codec, lane is not None, req.first_token))
            state = self.transport.send(xfer, frames, req.transport_info, self.timeout_s)
            e.sends[xfer] = state
            e.deadline = max(e.deadline, self.clock() + self.lease_s)
        state.on_end(lambda: self._send_ended(e, xfer))
        return None

    def _send_ended(self, e: _Export, xfer: TransferId) -> None:
        with self._cond:
            e.sends.pop(xfer, None)
            e.deadline = max(e.deadline, self.clock() + self.lease_s)
            self._cond.notify_all()  # a frame generator waiting for a layer gives up

    def release_cells(self, handle_id: str, layers: Span, heads: Span) -> None:
        with self._cond:
            e = self._exports.get(HandleId(handle_id))
            if e is not None:
                e.cells_left -= {(layer, h) for layer in range(layers.start, layers.stop)
                                 for h in range(heads.start, heads.stop)}

    def abort(self, xfer: str) -> None:
        with self._cond:
            states = [e.sends[TransferId(xfer)] for e in self._exports.values() if TransferId(xfer) in e.sends]
        for s in states:
            s.cancel("aborted by the receiver")

    def _frames(self, e: _Export, xfer: TransferId, pick: _Pick) -> Iterator[bytes | wire.TensorFrame]:
        """One frame per layer, each produced once its layer is in the pool: wire chunks, or one
        `TensorFrame` whose parts stay on the pool's device when the transport has a tensor lane.
        Stops as soon as the send ends (abort, timeout) so the blocks are never read after release."""
        h, layers, heads, codec = e.handle, pick.layers, pick.heads, pick.codec
        slots = token_slots(e.shard.block_ids, self.pool.layout.block_size, h.num_tokens,
                            self.pool.device)[pick.first_token:]
        local_heads = slice(heads.start - self.heads.start, heads.stop - self.heads.start)
        for layer in range(layers.start, layers.stop):
            local = layer - self.layers.start
            with self._cond:
                if not self._cond.wait_for(lambda: e.ready_layers > local or xfer not in e.sends, self.timeout_s):
                    raise TimeoutError(f"layer {layer} was never written")
                if xfer not in e.sends:
                    return
            stage = self._stager.on_device if pick.tensors else self._stager.to_host
            parts = stage(self._events.get(local), lambda: codec.encode(
                gather_slab(self.pool, local, slots, local_heads)))  # slab (2, T, heads, D)
            shape = (2, h.num_tokens - pick.first_token, len(heads), self.pool.layout.head_dim)
            if pick.tensors:
                yield wire.tensor_frame(codec.name, self.pool.kv.dtype, shape, layer, heads.start, parts)
            else:
                yield from wire.encode_frame(codec.name, self.pool.kv.dtype, shape, layer, heads.start, parts)


class _ControlService(pb_grpc.KVControlServicer):
    def __init__(self, sender: KVSender) -> None:
        self.sender = sender

    def StartPull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> pb.Ack:
        err = self.sender.start_pull(request)
        return pb.Ack(ok=err is None, error=err or "")

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.Ack:
        self.sender.release_cells(request.handle_id, Span(request.layers.start, request.layers.stop),
                                  Span(request.heads.start, request.heads.stop))
        return pb.Ack(ok=True)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.Ack:
        self.sender.abort(request.xfer_id)
        return pb.Ack(ok=True)
