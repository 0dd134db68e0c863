"""`SendPair`: the sender end (rank 0) of one torch-transport pair: a FIFO of transfers drained by
one thread, which forms the pair (joins the receiver's store, its gloo group and its tensor lane)
and then sends each transfer as BEGIN · CHUNK | TENSORS ... · END | ABORT."""

from __future__ import annotations

import collections
import datetime
import queue
import threading
import time
from typing import Iterable

import torch
import torch.distributed as dist

from pdserve.kvtransfer import torch_link as link
from pdserve.kvtransfer.tensor_transport import TensorTransport
from pdserve.kvtransfer.torch_feeder import Feeder, SourceError
from pdserve.kvtransfer.transfer import TransferState
from pdserve.kvtransfer.wire import TensorFrame


class SendPair:
    def __init__(self, info: str, timeout_s: float, host: str, device: torch.device, lane: str | None) -> None:
        """`info`: the receiver's connect info; `lane`: the tensor lane chosen for it (torch_link.choose_lane)."""
        self.info, self.timeout_s, self.host, self.device, self.lane = info, timeout_s, host, device, lane
        self.nonce = info.split("/")[1]
        self.queue: queue.Queue[tuple[TransferState, Iterable[object]] | None] = queue.Queue()
        self.dead: str | None = None
        self.store: dist.TCPStore | None = None
        self.tensors: TensorTransport | None = None
        self._next_check_s = 0.0
        self._current: TransferState | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"torch-send-{info}")
        self.thread.start()

    def _run(self) -> None:
        pg: dist.ProcessGroup | None = None
        try:
            host, port = self.info.split("/")[0].rsplit(":", 1)
            # connecting is bounded by close()'s join, not the pair timeout: the receiver's store is up
            # before its connect_info is handed out, so a refused connection means it is gone
            self.store = dist.TCPStore(host, int(port), 2, False, timeout=datetime.timedelta(seconds=link.JOIN_S / 2))
            self.store.set_timeout(datetime.timedelta(seconds=self.timeout_s))
            if self.store.add(f"{self.nonce}/{link.GATE}", 1) != 1:
                return self._die(f"cannot join pair {self.info}: the receiver closed")
            self.store.set(f"{self.nonce}/{link.LANE}", self.lane or link.NO_LANE)
            pg = link.new_group(self.store, self.nonce, 0, self.timeout_s, self.host)
            if self.lane is not None:
                self.tensors = link.open_lane(self.lane, self.store, self.nonce, False, self.device,
                                              self.timeout_s, self.host)
        except Exception as e:  # receiver gone before the pair formed
            return self._die(f"cannot join pair {self.info}: {e}")
        try:
            self._serve(pg)
        finally:
            pg = None  # noqa: F841 - destroying the group closes its sockets: a receiver blocked in gloo wakes
            if self.tensors is not None:
                self.tensors.close()
                self.tensors = None
            link.set_key(self.store, f"{self.nonce}/{link.TX_CLOSED}")

    def _serve(self, pg: dist.ProcessGroup) -> None:
        while True:
            try:
                item = self.queue.get(timeout=link.PEER_POLL_S)
            except queue.Empty:
                if self.peer_closed(rate_limited=False):
                    return self._die("the receiver closed")
                continue
            if item is None:
                return self._die("transport closed")
            state, chunks = item
            self._current = state
            try:
                self._send_one(pg, state, chunks)
            except RuntimeError as e:  # gloo: the receiver died or the pair timed out
                state.fail(f"torch transport: {e}")
                return self._die(str(e))
            finally:
                self._current = None

    def peer_closed(self, rate_limited: bool = True) -> bool:
        """The receiver set its "closed" key (or its store is gone); polled at most every `PEER_POLL_S`."""
        now = time.monotonic()
        if rate_limited and now < self._next_check_s:
            return False
        self._next_check_s = now + link.PEER_POLL_S
        return self.store is None or link.has(self.store, f"{self.nonce}/{link.RX_CLOSED}")

    def close(self) -> None:
        """Fail what is queued or sending and let the thread leave; tell the receiver at once, in case
        this end is blocked in gloo on a message the receiver is not waiting for."""
        current = self._current
        if current is not None:
            current.fail("transport closed")
        self.queue.put(None)
        link.set_key(self.store, f"{self.nonce}/{link.TX_CLOSED}")

    def _send_one(self, pg: dist.ProcessGroup, state: TransferState, chunks: Iterable[object]) -> None:
        if state.status().terminal:
            return  # cancelled before it started: the receiver never hears of it
        state.start()
        feeder, out = Feeder(chunks, f"torch-feed-{state.xfer}"), _Posted(pg)
        out.msg(link.BEGIN, state.xfer.encode())
        try:
            for c in feeder.chunks(state, self.peer_closed):
                self._send_item(out, state, c)
        except SourceError as e:  # the chunk source failed (e.g. a layer never became ready)
            state.fail(f"sender: {type(e.cause).__name__}: {e.cause}")
        finally:
            feeder.stop()
        if state.status().terminal:
            out.msg(link.ABORT, (state.error or "aborted").encode())
        else:
            out.msg(link.END, b"")
        out.flush()
        if not state.status().terminal:
            state.finish()

    def _send_item(self, out: _Posted, state: TransferState, item: object) -> None:
        """A wire chunk as CHUNK; a TensorFrame as TENSORS (its header), then its parts on the lane."""
        if not isinstance(item, TensorFrame):
            out.msg(link.CHUNK, item)  # type: ignore[arg-type]
            state.nbytes += len(item)  # type: ignore[arg-type]
            return
        if self.tensors is None:
            raise SourceError(ValueError("a tensor frame on a pair without a tensor lane"))
        out.msg(link.TENSORS, item.header)
        parts = [p.to(self.device) for p in item.parts]  # int4_zstd's host blobs go to the lane's GPU
        out.track(self.tensors.post_send(parts), parts)  # in flight with the next frame's messages
        state.nbytes += item.nbytes

    def _die(self, why: str) -> None:
        self.dead = why
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[0].fail(f"torch pair dead: {why}")


class _Posted:
    """gloo sends posted and not yet complete, at most `DEPTH` messages deep: the next message goes
    out without a round trip per message. Each entry keeps its tensors (and so the chunk) alive."""

    def __init__(self, pg: dist.ProcessGroup) -> None:
        self.pg = pg
        self.sends: collections.deque[tuple[list[dist.Work], list[torch.Tensor]]] = collections.deque()

    def msg(self, kind: int, payload: bytes | memoryview) -> None:
        """(kind, length), then the payload as a tensor over its own bytes."""
        tensors = [torch.tensor([kind, len(payload)], dtype=torch.int64)]
        if len(payload):
            tensors.append(torch.frombuffer(payload, dtype=torch.uint8))
        self.sends.append(([self.pg.send([t], 1, tag) for t, tag in zip(tensors, (link.META_TAG, link.PAYLOAD_TAG))],
                           tensors))
        while len(self.sends) > link.DEPTH:
            self._wait_oldest()

    def track(self, works: list[dist.Work], tensors: list[torch.Tensor]) -> None:
        """Sends posted elsewhere (the tensor lane) that count towards the depth like messages."""
        self.sends.append((works, tensors))
        while len(self.sends) > link.DEPTH:
            self._wait_oldest()

    def flush(self) -> None:
        while self.sends:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        for w in self.sends.popleft()[0]:
            w.wait()
