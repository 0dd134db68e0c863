"""`RecvPair`: the receiver end (rank 1, store host) of one torch-transport pair. A receive thread
posts gloo receives only while a transfer is expected and hands messages to a delivery thread,
which runs the sinks; a TENSORS message's parts are received on the pair's tensor lane, into
tensors on this end's device, and delivered as one decoded `wire.Frame`."""

from __future__ import annotations

import datetime
import queue
import threading
import uuid

import torch
import torch.distributed as dist

from pdserve.kvtransfer import torch_link as link
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.protocols import ChunkSink
from pdserve.kvtransfer.tensor_transport import TensorTransport
from pdserve.kvtransfer.transfer import TransferState
from pdserve.kvtransfer.types import TransferId

Message = tuple[int, "torch.Tensor | wire.Frame"]


class RecvPair:
    def __init__(self, listen: Listen, timeout_s: float, device: torch.device, lane_mode: str) -> None:
        """`lane_mode`: this end's `kvtransfer.tensor_lane`, advertised to the sender (who decides)."""
        self.timeout_s, self.host, self.device = timeout_s, listen.local_host, torch.device(device)
        self.store = listen.bind(lambda port: dist.TCPStore(
            listen.bind_host, port, 2, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False))
        self.nonce = uuid.uuid4().hex[:12]
        self.info = f"{listen.addr(self.store.port)}/{self.nonce}/{lane_mode}:{self.device.type}"
        self.expected: dict[TransferId, tuple[ChunkSink, TransferState]] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.dead: str | None = None
        self.lane: str | None = None  # set once the sender has formed the pair
        self.tensors: TensorTransport | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"torch-recv-{self.info}")
        self._inbox: queue.Queue[Message | None] = queue.Queue(link.DEPTH)
        self._delivery = threading.Thread(target=self._dispatch, args=(self._inbox,), daemon=True,
                                          name=f"torch-deliver-{self.info}")
        self.thread.start()

    def expect(self, state: TransferState, sink: ChunkSink) -> None:
        with self.cond:
            self.expected[state.xfer] = (sink, state)
            self.cond.notify_all()
        state.on_end(lambda: self._forget(state.xfer))

    def _forget(self, xfer: TransferId) -> None:
        with self.cond:
            self.expected.pop(xfer, None)

    def close(self) -> None:
        """Stop posting receives and tell the sender, who destroys its group if this end is blocked
        in gloo waiting for it (which wakes this end)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        link.set_key(self.store, f"{self.nonce}/{link.RX_CLOSED}")

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        if not self.thread.is_alive():
            self.store = None  # type: ignore[assignment]  # stops the store's server thread

    def _await_sender(self) -> bool:
        """Wait (in Python) until the sender commits to forming the pair; False if this end closed
        first or the sender announced its own close."""
        gate = f"{self.nonce}/{link.GATE}"
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed, link.POLL_S)
                closed = self.closed
            if closed:
                return self.store.add(gate, 1) != 1  # the sender came first: it is forming, so form too
            if self.store.add(gate, 0) >= 1:
                return True

    def _form(self) -> dist.ProcessGroup:
        """The pair's gloo group and, if the sender chose one, its tensor lane (both ends form both)."""
        lane = self.store.get(f"{self.nonce}/{link.LANE}").decode()
        pg = link.new_group(self.store, self.nonce, 1, self.timeout_s, self.host)
        if lane != link.NO_LANE:
            self.tensors = link.open_lane(lane, self.store, self.nonce, True, self.device, self.timeout_s, self.host)
            self.lane = lane
        return pg

    def _run(self) -> None:
        """Receive stage: posts receives and hands messages to the delivery stage in order."""
        inbox = self._inbox
        self._delivery.start()
        pg: dist.ProcessGroup | None = None
        try:
            if not self._await_sender():
                return self._die("transport closed")
            pg = self._form()
            in_transfer = False
            while True:
                kind, payload = self._next(pg, idle=not in_transfer)
                if kind is None:
                    return
                inbox.put((kind, payload))
                in_transfer = kind in (link.BEGIN, link.CHUNK, link.TENSORS)
                if not in_transfer:
                    inbox.join()  # the transfer has ended (and left `expected`) before the next idle check
        except (RuntimeError, wire.WireError) as e:  # gloo: the sender died, or a receive outlived the group timeout
            self._die(f"torch transport: {e}")
        finally:
            pg = None  # noqa: F841 - destroying the group closes its sockets: a sender blocked in gloo wakes
            if self.tensors is not None:
                self.tensors.close()
                self.tensors = None
            inbox.put(None)
            self._delivery.join()

    def _dispatch(self, inbox: queue.Queue[Message | None]) -> None:
        """Delivery stage: runs sinks and transfer state changes, one message at a time."""
        current: tuple[ChunkSink, TransferState] | None = None
        while (item := inbox.get()) is not None:
            kind, payload = item
            try:
                if kind == link.BEGIN:
                    with self.cond:
                        current = self.expected.get(TransferId(_text(payload)))
                    if current is not None:
                        current[1].start()
                elif kind in (link.CHUNK, link.TENSORS) and current is not None and not current[1].status().terminal:
                    self._deliver(current, payload)
                elif kind in (link.END, link.ABORT):
                    if current is not None:
                        current[1].finish() if kind == link.END else current[1].fail(_text(payload))
                    current = None
            finally:
                inbox.task_done()

    def _deliver(self, current: tuple[ChunkSink, TransferState], payload: torch.Tensor | wire.Frame) -> None:
        sink, state = current
        try:
            if isinstance(payload, wire.Frame):
                state.nbytes += sum(p.numel() * p.element_size() for p in payload.parts)
                sink(payload)  # type: ignore[arg-type]  # a tensor lane hands whole frames (protocols.ChunkSink)
            else:
                state.nbytes += payload.numel()
                sink(memoryview(payload.numpy()))
        except Exception as e:  # the sink rejected a chunk; keep draining to stay in step with the sender
            state.fail(f"{type(e).__name__}: {e}")

    def _next(self, pg: dist.ProcessGroup, idle: bool) -> tuple[int | None, torch.Tensor | wire.Frame]:
        """Next message. Between transfers it waits, without posting a receive, until one is expected
        (gloo cannot cancel a posted receive: one left waiting past the group timeout kills the pair,
        and a thread blocked in one only wakes on data or when the sender destroys its group)."""
        while idle:
            with self.cond:
                if self.cond.wait_for(lambda: self.closed or bool(self.expected), link.PEER_POLL_S):
                    if self.closed:
                        return None, torch.empty(0)
                    break
            if link.has(self.store, f"{self.nonce}/{link.TX_CLOSED}"):
                self._die("torch transport: the sender closed")
                return None, torch.empty(0)
        meta = torch.empty(2, dtype=torch.int64)
        pg.recv([meta], 0, link.META_TAG).wait()
        kind, n = int(meta[0]), int(meta[1])
        payload = torch.empty(n, dtype=torch.uint8)
        if n and (kind == link.TENSORS or not self.closed):
            pg.recv([payload], 0, link.PAYLOAD_TAG).wait()
        if kind == link.TENSORS:  # the sender is committed to the parts: receive them even when closing
            return kind, self._lane_frame(payload)
        if self.closed:
            return None, torch.empty(0)
        return kind, payload

    def _lane_frame(self, header: torch.Tensor) -> wire.Frame:
        if self.tensors is None:
            raise wire.WireError("tensor frame on a pair without a tensor lane")
        h, parts = wire.lane_buffers(header.numpy().tobytes(), self.device)
        self.tensors.recv(parts)
        return wire.lane_frame(h, parts)

    def _die(self, why: str) -> None:
        with self.cond:
            self.dead = why
            expected = [s for _, s in self.expected.values()]
        for s in expected:
            s.fail(why)


def _text(payload: object) -> str:
    return payload.numpy().tobytes().decode()  # type: ignore[attr-defined]
