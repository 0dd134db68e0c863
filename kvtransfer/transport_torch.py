"""`TorchTransport`: host bytes over torch.distributed gloo point-to-point (device tensors: tensor_transport.py).

Every (sender, receiver) pair gets its own 2-rank process group over its own TCPStore, created
lazily: the receiver hosts the store (`connect_info` returns "host:port/nonce"), the sender joins
when its first `send` names it. One peer dying breaks only its pairs; the next `connect_info`
builds a fresh one. Data flows sender (rank 0) -> receiver (rank 1) as messages, in order:

    BEGIN(xfer) · CHUNK(n) bytes · ... · END | ABORT(reason)

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

Both ends are pipelines, `_DEPTH` chunks deep: on the sender a feeder thread pulls chunks from the
source (gather, encode, frame, crc) while the pair's thread keeps up to `_DEPTH` messages posted to
gloo (meta and payload on separate tags, each kind in order); on the receiver the pair's thread
receives the next message while a delivery thread runs the sink on the previous chunk. Chunks go to gloo as tensors over their own bytes (torch.frombuffer, no copy).
"""

from __future__ import annotations

import collections
import datetime
import queue
import threading
import time
import uuid
import warnings
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from pdserve.kvtransfer.at_exit import close_at_exit, forget
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.protocols import ChunkSink
from pdserve.kvtransfer.transfer import TransferState, failed
from pdserve.kvtransfer.types import TransferId

BEGIN, CHUNK, END, ABORT = 1, 2, 3, 4
_DEPTH = 2  # chunks in flight between the two stages of each end's pipeline
_POLL_S = 0.05  # how often a stage blocked on its queue checks for cancellation
_META_TAG, _PAYLOAD_TAG = 0, 1  # separate tags keep each kind in order while several are posted
_PEER_POLL_S = 0.1  # how often an end waiting in Python checks the store for the peer's "closed" key
_JOIN_S = 5.0  # how long close() waits for a pair's threads (they leave within ~2 polls)
_GATE, _TX_CLOSED, _RX_CLOSED = "gate", "tx-closed", "rx-closed"  # store keys, under the pair's nonce

# gloo only reads a send buffer, so a tensor over the (read-only) bytes of a chunk is safe. torch warns
# about read-only buffers once per process: spend that warning here, silenced, at import.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)


class _SourceError(Exception):
    """The chunk source raised `cause` (as opposed to gloo failing, which kills the pair)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Feeder:
    """Runs a chunk source on its own thread, at most `_DEPTH` chunks ahead of the consumer."""

    def __init__(self, chunks: Iterable[bytes | memoryview], name: str) -> None:
        self._chunks = chunks
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(_DEPTH)
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name=name).start()

    def _run(self) -> None:
        try:
            for c in self._chunks:
                if not self._put((CHUNK, c)):
                    return
            self._put((END, None))
        except BaseException as e:  # noqa: BLE001 - any failure of the source fails the transfer
            self._put((ABORT, e))

    def _put(self, item: tuple[int, object]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def chunks(self, state: TransferState, peer_closed: Callable[[], bool]) -> Iterator[bytes | memoryview]:
        """Chunks in order until the source ends or `state` turns terminal; the source's exception
        comes out as `_SourceError`. While the source keeps it waiting it watches `peer_closed`."""
        while not state.status().terminal:
            try:
                kind, item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if peer_closed():
                    state.fail("torch transport: the receiver closed")
                continue
            if kind == END:
                return
            if kind == ABORT:
                raise _SourceError(item)  # type: ignore[arg-type]
            yield item  # type: ignore[misc]

    def stop(self) -> None:
        """Let the feeder thread end (at its next chunk, if the source is blocked)."""
        self._stop.set()


def _new_group(store: dist.Store, nonce: str, rank: int, timeout_s: float, host: str) -> dist.ProcessGroup:
    """gloo's default device binds whatever the machine's hostname resolves to (often loopback, or
    an address another network namespace does not have): bind this node's KV address instead."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore(nonce, store), rank, 2, opts)


def _has(store: dist.Store, key: str) -> bool:
    """Whether `key` is set; True when the store is unreachable (its host, the receiver, is gone)."""
    try:
        return store.check([key])
    except Exception:  # noqa: BLE001 - any store failure means the pair is over
        return True


def _set(store: dist.Store | None, key: str) -> None:
    if store is None:
        return
    try:
        store.set(key, b"1")
    except Exception:  # noqa: BLE001 - the peer (and its store) is already gone: nothing to tell
        pass


class _SendPair:
    """Sender end of one pair: a FIFO of transfers drained by one thread (rank 0)."""

    def __init__(self, info: str, timeout_s: float, host: str) -> None:
        self.info, self.timeout_s, self.host = info, timeout_s, host
        self.nonce = info.split("/")[1]
        self.queue: queue.Queue[tuple[TransferState, Iterable[bytes | memoryview]] | None] = queue.Queue()
        self.dead: str | None = None
        self.store: dist.TCPStore | None = None
        self._next_check_s = 0.0
        self._current: TransferState | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"torch-send-{info}")
        self.thread.start()

    def _run(self) -> None:
        pg: dist.ProcessGroup | None = None
        try:
            addr = self.info.split("/")[0]
            host, port = addr.rsplit(":", 1)
            # connecting is bounded by close()'s join, not the pair timeout: the receiver's store is up
            # before its connect_info is handed out, so a refused connection means it is gone
            self.store = dist.TCPStore(host, int(port), 2, False, timeout=datetime.timedelta(seconds=_JOIN_S / 2))
            self.store.set_timeout(datetime.timedelta(seconds=self.timeout_s))
            if self.store.add(f"{self.nonce}/{_GATE}", 1) != 1:
                return self._die(f"cannot join pair {self.info}: the receiver closed")
            pg = _new_group(self.store, self.nonce, 0, self.timeout_s, self.host)
        except Exception as e:  # receiver gone before the pair formed
            return self._die(f"cannot join pair {self.info}: {e}")
        try:
            self._serve(pg)
        finally:
            pg = None  # noqa: F841 - destroying the group closes its sockets: a receiver blocked in gloo wakes
            _set(self.store, f"{self.nonce}/{_TX_CLOSED}")

    def _serve(self, pg: dist.ProcessGroup) -> None:
        while True:
            try:
                item = self.queue.get(timeout=_PEER_POLL_S)
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
        """The receiver set its "closed" key (or its store is gone); polled at most every `_PEER_POLL_S`."""
        now = time.monotonic()
        if rate_limited and now < self._next_check_s:
            return False
        self._next_check_s = now + _PEER_POLL_S
        return self.store is None or _has(self.store, f"{self.nonce}/{_RX_CLOSED}")

    def close(self) -> None:
        """Fail what is queued or sending and let the thread leave; tell the receiver at once, in case
        this end is blocked in gloo on a message the receiver is not waiting for."""
        current = self._current
        if current is not None:
            current.fail("transport closed")
        self.queue.put(None)
        _set(self.store, f"{self.nonce}/{_TX_CLOSED}")

    def _send_one(self, pg: dist.ProcessGroup, state: TransferState, chunks: Iterable[bytes | memoryview]) -> None:
        if state.status().terminal:
            return  # cancelled before it started: the receiver never hears of it
        state.start()
        feeder, out = _Feeder(chunks, f"torch-feed-{state.xfer}"), _Posted(pg)
        out.msg(BEGIN, state.xfer.encode())
        try:
            for c in feeder.chunks(state, self.peer_closed):
                out.msg(CHUNK, c)
                state.nbytes += len(c)
        except _SourceError as e:  # the chunk source failed (e.g. a layer never became ready)
            state.fail(f"sender: {type(e.cause).__name__}: {e.cause}")
        finally:
            feeder.stop()
        if state.status().terminal:
            out.msg(ABORT, (state.error or "aborted").encode())
            out.flush()
        else:
            out.msg(END, b"")
            out.flush()
            state.finish()

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
    """gloo sends posted and not yet complete, at most `_DEPTH` messages deep: the next message goes
    out without a round trip per message. Each entry keeps its tensors (and so the chunk) alive."""

    def __init__(self, pg: dist.ProcessGroup) -> None:
        self.pg = pg
        self.sends: collections.deque[tuple[list[dist.Work], list[torch.Tensor]]] = collections.deque()

    def msg(self, kind: int, payload: bytes | memoryview) -> None:
        """(kind, length), then the payload as a tensor over its own bytes."""
        tensors = [torch.tensor([kind, len(payload)], dtype=torch.int64)]
        if len(payload):
            tensors.append(torch.frombuffer(payload, dtype=torch.uint8))
        self.sends.append(([self.pg.send([t], 1, tag) for t, tag in zip(tensors, (_META_TAG, _PAYLOAD_TAG))],
                           tensors))
        while len(self.sends) > _DEPTH:
            self._wait_oldest()

    def flush(self) -> None:
        while self.sends:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        for w in self.sends.popleft()[0]:
            w.wait()


class _RecvPair:
    """Receiver end of one pair (rank 1, store host): dispatches incoming transfers to their sinks."""

    def __init__(self, listen: Listen, timeout_s: float) -> None:
        self.timeout_s, self.host = timeout_s, listen.local_host
        self.store = listen.bind(lambda port: dist.TCPStore(
            listen.bind_host, port, 2, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False))
        self.nonce = uuid.uuid4().hex[:12]
        self.info = f"{listen.addr(self.store.port)}/{self.nonce}"
        self.expected: dict[TransferId, tuple[ChunkSink, TransferState]] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.dead: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"torch-recv-{self.info}")
        self._inbox: queue.Queue[tuple[int, torch.Tensor] | None] = queue.Queue(_DEPTH)
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
        _set(self.store, f"{self.nonce}/{_RX_CLOSED}")

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        if not self.thread.is_alive():
            self.store = None  # type: ignore[assignment]  # stops the store's server thread

    def _await_sender(self) -> bool:
        """Wait (in Python) until the sender commits to forming the pair; False if this end closed
        first or the sender announced its own close."""
        gate = f"{self.nonce}/{_GATE}"
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed, _POLL_S)
                closed = self.closed
            if closed:
                return self.store.add(gate, 1) != 1  # the sender came first: it is forming, so form too
            if self.store.add(gate, 0) >= 1:
                return True

    def _run(self) -> None:
        """Receive stage: posts receives and hands messages to the delivery stage in order."""
        inbox = self._inbox
        self._delivery.start()
        pg: dist.ProcessGroup | None = None
        try:
            if not self._await_sender():
                return self._die("transport closed")
            pg = _new_group(self.store, self.nonce, 1, self.timeout_s, self.host)
            in_transfer = False
            while True:
                kind, payload = self._next(pg, idle=not in_transfer)
                if kind is None:
                    return
                inbox.put((kind, payload))
                in_transfer = kind in (BEGIN, CHUNK)
                if not in_transfer:
                    inbox.join()  # the transfer has ended (and left `expected`) before the next idle check
        except RuntimeError as e:  # gloo: the sender died, or a receive outlived the group timeout
            self._die(f"torch transport: {e}")
        finally:
            pg = None  # noqa: F841 - destroying the group closes its sockets: a sender blocked in gloo wakes
            inbox.put(None)
            self._delivery.join()

    def _dispatch(self, inbox: queue.Queue[tuple[int, torch.Tensor] | None]) -> None:
        """Delivery stage: runs sinks and transfer state changes, one message at a time."""
        current: tuple[ChunkSink, TransferState] | None = None
        while (item := inbox.get()) is not None:
            kind, payload = item
            try:
                if kind == BEGIN:
                    with self.cond:
                        current = self.expected.get(TransferId(payload.numpy().tobytes().decode()))
                    if current is not None:
                        current[1].start()
                elif kind == CHUNK and current is not None and not current[1].status().terminal:
                    self._deliver(current, payload)
                elif kind in (END, ABORT):
                    if current is not None:
                        current[1].finish() if kind == END else current[1].fail(payload.numpy().tobytes().decode())
                    current = None
            finally:
                inbox.task_done()

    def _deliver(self, current: tuple[ChunkSink, TransferState], payload: torch.Tensor) -> None:
        sink, state = current
        state.nbytes += payload.numel()
        try:
            sink(memoryview(payload.numpy()))
        except Exception as e:  # the sink rejected a chunk; keep draining to stay in step with the sender
            state.fail(f"{type(e).__name__}: {e}")

    def _next(self, pg: dist.ProcessGroup, idle: bool) -> tuple[int | None, torch.Tensor]:
        """Next message. Between transfers it waits, without posting a receive, until one is expected
        (gloo cannot cancel a posted receive: one left waiting past the group timeout kills the pair,
        and a thread blocked in one only wakes on data or when the sender destroys its group)."""
        while idle:
            with self.cond:
                if self.cond.wait_for(lambda: self.closed or bool(self.expected), _PEER_POLL_S):
                    if self.closed:
                        return None, torch.empty(0)
                    break
            if _has(self.store, f"{self.nonce}/{_TX_CLOSED}"):
                self._die("torch transport: the sender closed")
                return None, torch.empty(0)
        meta = torch.empty(2, dtype=torch.int64)
        pg.recv([meta], 0, _META_TAG).wait()
        if self.closed:
            return None, torch.empty(0)
        kind, n = int(meta[0]), int(meta[1])
        payload = torch.empty(n, dtype=torch.uint8)
        if n:
            pg.recv([payload], 0, _PAYLOAD_TAG).wait()
        return kind, payload

    def _die(self, why: str) -> None:
        with self.cond:
            self.dead = why
            expected = [s for _, s in self.expected.values()]
        for s in expected:
            s.fail(why)


class TorchTransport:
    name = "torch"

    def __init__(self, listen: Listen, pair_timeout_s: float = 300.0) -> None:
        """`pair_timeout_s` bounds one gloo operation; keep it above every transfer's timeout."""
        self.listen, self.pair_timeout_s = listen, pair_timeout_s
        self._endpoint = f"torch:{uuid.uuid4().hex[:12]}"
        self._send_pairs: dict[str, _SendPair] = {}
        self._recv_pairs: dict[str, _RecvPair] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._exit_token = close_at_exit(self, TorchTransport.close)

    def endpoint(self) -> str:
        return self._endpoint

    def connect_info(self, peer: str) -> str:
        with self._lock:
            pair = self._recv_pairs.get(peer)
            if pair is None or pair.dead is not None:
                if pair is not None:
                    pair.close()
                pair = self._recv_pairs[peer] = _RecvPair(self.listen, self.pair_timeout_s)
            return pair.info

    def send(self, xfer: TransferId, chunks: Iterable[bytes | memoryview], peer: str,
             timeout_s: float) -> TransferState:
        with self._lock:
            if self._closed:
                return failed(xfer, "transport closed")
            pair = self._send_pairs.get(peer)
            if pair is None or pair.dead is not None:
                pair = self._send_pairs[peer] = _SendPair(peer, self.pair_timeout_s, self.listen.local_host)
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
        deadline = time.monotonic() + _JOIN_S
        for sp in send_pairs:
            sp.thread.join(max(0.0, deadline - time.monotonic()))
        for rp in recv_pairs:
            rp.join(max(0.0, deadline - time.monotonic()))
        forget(self._exit_token)
