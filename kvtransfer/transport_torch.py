"""`TorchTransport`: KV over torch.distributed: wire chunks over a gloo pair, and KV tensors over the
pair's tensor lane (NCCL between GPUs, gloo between CPU pools, CUDA IPC on one node; tensor_transport.py).

Every (sender, receiver) pair gets its own 2-rank process group over its own TCPStore, created
lazily: the receiver hosts the store (`connect_info` returns "host:port/nonce/lane:device"), the sender joins
when its first `send` names it. One peer dying breaks only its pairs; the next `connect_info`
builds a fresh one. Data flows sender (rank 0) -> receiver (rank 1) as messages, in order:

    BEGIN(xfer) · CHUNK(n) bytes | TENSORS(header) + parts on the lane · ... · END | ABORT(reason)

Tensor lane (`kvtransfer.tensor_lane`): the receiver advertises its mode and device type in its
connect info; the sender chooses (torch_link.choose_lane) and writes its choice to the pair's store
before forming the pair, and KVSender then sends `wire.TensorFrame`s: each layer's codec parts move
as tensors on their device, never through host bytes. Modules: torch_link.py (shared constants, the
gloo group, the lane), torch_feeder.py, torch_send_pair.py, torch_recv_pair.py.

The receiver posts a receive only while it expects a transfer (a gloo receive that outlives the
group timeout closes the pair); a late BEGIN of an aborted transfer is drained with the next one.

Nothing is ever left blocked inside gloo or the store (a thread that returns from native code while
the interpreter finalizes aborts the process). gloo cannot cancel a posted operation, but one wakes
at once when the peer's group is destroyed; so each end only blocks in gloo while the other end is
committed to answer, and every Python-level wait also watches the pair's store for the peer's
"closed" key. Closing one end: set its key, leave gloo, destroy its group; that wakes the other end.
Forming a pair is gated the same way: both ends `add` to a gate key, and the one that comes second
knows the other is committed (the sender to forming, or the receiver to having closed). Every live
transport is closed at interpreter exit (kvtransfer/at_exit.py).

Both ends are pipelines, `DEPTH` chunks deep: on the sender a feeder thread pulls chunks from the
source (gather, encode, frame, crc) while the pair's thread keeps up to `DEPTH` messages posted to
gloo (meta and payload on separate tags, each kind in order); on the receiver the pair's thread
receives the next message while a delivery thread runs the sink on the previous chunk. Chunks go
to gloo as tensors over their own bytes (torch.frombuffer, no copy).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Iterable

import torch

from pdserve.config import TensorLane
from pdserve.kvtransfer.at_exit import close_at_exit, forget
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.protocols import ChunkSink
from pdserve.kvtransfer.torch_link import JOIN_S, choose_lane
from pdserve.kvtransfer.torch_recv_pair import RecvPair
from pdserve.kvtransfer.torch_send_pair import SendPair
from pdserve.kvtransfer.transfer import TransferState, failed
from pdserve.kvtransfer.types import TransferId


class TorchTransport:
    name = "torch"

    def __init__(self, listen: Listen, pair_timeout_s: float = 300.0, device: torch.device | str = "cpu",
                 tensor_lane: TensorLane = "auto") -> None:
        """`pair_timeout_s` bounds one gloo operation; keep it above every transfer's timeout. `device`:
        the pool's device (where lane tensors are sent from and received into). Opens nothing."""
        self.listen, self.pair_timeout_s = listen, pair_timeout_s
        self.device, self.lane_mode = torch.device(device), tensor_lane
        self._endpoint = f"torch:{uuid.uuid4().hex[:12]}"
        self._send_pairs: dict[str, SendPair] = {}
        self._recv_pairs: dict[str, RecvPair] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._exit_token: int | None = None

    def start(self) -> TorchTransport:
        """Register for closing at exit; pairs (and their sockets) open lazily. Idempotent."""
        if self._exit_token is None:
            self._exit_token = close_at_exit(self, TorchTransport.close)
        return self

    def endpoint(self) -> str:
        return self._endpoint

    def tensor_lane(self, peer: str) -> str | None:
        return choose_lane(peer, self.device, self.listen.local_host)

    def connect_info(self, peer: str) -> str:
        with self._lock:
            pair = self._recv_pairs.get(peer)
            if pair is None or pair.dead is not None:
                if pair is not None:
                    pair.close()
                pair = self._recv_pairs[peer] = RecvPair(self.listen, self.pair_timeout_s, self.device, self.lane_mode)
            return pair.info

    def send(self, xfer: TransferId, chunks: Iterable[object], peer: str, timeout_s: float) -> TransferState:
        """`chunks`: wire chunks, or `wire.TensorFrame`s when `tensor_lane(peer)` is not None."""
        with self._lock:
            if self._closed:
                return failed(xfer, "transport closed")
            pair = self._send_pairs.get(peer)
            if pair is None or pair.dead is not None:
                try:
                    lane = choose_lane(peer, self.device, self.listen.local_host)
                except ValueError as e:
                    return failed(xfer, str(e))
                pair = self._send_pairs[peer] = SendPair(peer, self.pair_timeout_s, self.listen.local_host,
                                                         self.device, lane)
        state = TransferState(xfer)
        state.arm(timeout_s)
        pair.queue.put((state, chunks))
        return state

    def recv(self, xfer: TransferId, peer: str, sink: ChunkSink, timeout_s: float) -> TransferState:
        with self._lock:
            pair = self._recv_pairs.get(peer)
            if self._closed or pair is None or pair.dead is not None:
                why = "transport closed" if self._closed else (pair.dead if pair else "no pair: call connect_info first")
                return failed(xfer, why or "pair dead")
        state = TransferState(xfer)
        state.arm(timeout_s)
        pair.expect(state, sink)
        return state

    def close(self) -> None:
        """Fail every transfer, then leave gloo in order: each end tells its peer and destroys its
        group once its thread is out of gloo. Bounded: a pair's threads leave within two polls while
        the peer lives, and at once when it is gone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            send_pairs, recv_pairs = list(self._send_pairs.values()), list(self._recv_pairs.values())
        for sp in send_pairs:
            sp.close()
        for rp in recv_pairs:
            rp.close()
            rp._die("transport closed")
        deadline = time.monotonic() + JOIN_S
        for sp in send_pairs:
            sp.thread.join(max(0.0, deadline - time.monotonic()))
        for rp in recv_pairs:
            rp.join(max(0.0, deadline - time.monotonic()))
        if self._exit_token is not None:
            forget(self._exit_token)
