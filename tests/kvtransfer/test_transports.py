"""Transport conformance: every transport moves ordered chunks the same way and fails the same way.

loopback and gRPC run both ends in this process (gRPC over localhost); torch runs the sender in a
second process (gloo), since that is the deployment shape and the failure mode that matters.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Iterator

import pytest

from pdserve.kvtransfer.factories import make_transport
from pdserve.kvtransfer.types import TransferId, TransferStatus
from tests.kvtransfer.peer import chunked, payload, serve
from tests.net import LOCAL

DONE, FAILED = TransferStatus.DONE, TransferStatus.FAILED


class LocalPeer:
    """Sender end in this process."""

    def __init__(self, name: str) -> None:
        self.t = make_transport(name, LOCAL).start()
        self.endpoint = self.t.endpoint()

    def send(self, xfer: str, info: str, nbytes: int, seed: int = 0, chunk: int = 1 << 20,
             delay_s: float = 0.0, timeout_s: float = 10.0) -> object:
        return self.t.send(TransferId(xfer), chunked(payload(nbytes, seed), chunk, delay_s), info, timeout_s)

    def result(self, handle: object) -> tuple[str, str | None]:
        handle.wait(15)
        return handle.status().value, handle.error

    def kill(self) -> None:
        self.t.close()

    def close(self) -> None:
        self.t.close()


class ProcessPeer:
    """Sender end in a spawned process (torch/gloo)."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child,), daemon=True)
        self.proc.start()
        self.endpoint = self.conn.recv()
        self.results: dict[str, tuple[str, str | None]] = {}

    def send(self, xfer: str, info: str, nbytes: int, seed: int = 0, chunk: int = 1 << 20,
             delay_s: float = 0.0, timeout_s: float = 10.0) -> object:
        self.conn.send(("send", xfer, info, nbytes, seed, chunk, delay_s, timeout_s))
        return xfer

    def result(self, handle: object) -> tuple[str, str | None]:
        while handle not in self.results:
            assert self.conn.poll(20), "peer process did not answer"
            xfer, status, error = self.conn.recv()
            self.results[xfer] = (status, error)
        return self.results[handle]

    def kill(self) -> None:
        self.conn.send(("die",))
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("close",))
            while self.conn.poll(20) and self.conn.recv() != "closed":
                pass
            self.proc.join(10)


@pytest.fixture(scope="module")
def process_peers() -> Iterator[list[ProcessPeer]]:
    """One sender process shared by the torch tests (spawning costs ~4 s); replaced after a kill."""
    peers: list[ProcessPeer] = []
    yield peers
    for p in peers:
        p.close()


@pytest.fixture(params=["loopback", "grpc", "torch"])
def ends(request: pytest.FixtureRequest, process_peers: list[ProcessPeer]) -> Iterator[tuple[object, object]]:
    name = request.param
    if name == "torch":
        if not process_peers or not process_peers[-1].proc.is_alive():
            process_peers.append(ProcessPeer())
        peer: object = process_peers[-1]
    else:
        peer = LocalPeer(name)
    rx = make_transport(name, LOCAL, serve=False).start()  # a fresh receiver: a new pair (own TCPStore) per test
    yield peer, rx
    rx.close()
    if name != "torch":
        peer.close()


def _recv(rx: object, peer: object, xfer: str, timeout_s: float = 10.0) -> tuple[object, list[bytes]]:
    got: list[bytes] = []
    state = rx.recv(TransferId(xfer), peer.endpoint, lambda c: got.append(bytes(c)), timeout_s)
    return state, got


@pytest.mark.parametrize("nbytes", [0, 1, 9 << 20])
def test_round_trip_is_bit_exact(ends: tuple, nbytes: int) -> None:
    peer, rx = ends
    info = rx.connect_info(peer.endpoint)
    state, got = _recv(rx, peer, f"x{nbytes}")
    h = peer.send(f"x{nbytes}", info, nbytes, seed=nbytes, chunk=4 << 20)
    assert state.wait(15) is DONE, state.error
    assert peer.result(h)[0] == "done"
    assert b"".join(got) == payload(nbytes, nbytes)
    assert all(len(c) <= 4 << 20 for c in got)


def test_back_to_back_transfers_keep_their_own_bytes(ends: tuple) -> None:
    peer, rx = ends
    info = rx.connect_info(peer.endpoint)
    recvs = [_recv(rx, peer, f"y{i}") for i in range(3)]
    sends = [peer.send(f"y{i}", info, 1000 + i, seed=i, chunk=300) for i in range(3)]
    for i, (state, got) in enumerate(recvs):
        assert state.wait(15) is DONE, state.error
        assert b"".join(got) == payload(1000 + i, i)
    assert [peer.result(h)[0] for h in sends] == ["done"] * 3


def test_peer_closed_mid_transfer_fails(ends: tuple) -> None:
    peer, rx = ends
    info = rx.connect_info(peer.endpoint)
    state, got = _recv(rx, peer, "z", timeout_s=20)
    peer.send("z", info, 200 << 10, chunk=1 << 10, delay_s=0.01)  # ~2 s of trickle
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got, "nothing arrived"
    peer.kill()
    assert state.wait(15) is FAILED
    assert state.error


def test_timeout_when_nobody_sends(ends: tuple) -> None:
    peer, rx = ends
    rx.connect_info(peer.endpoint)
    t0 = time.monotonic()
    state, _ = _recv(rx, peer, "never", timeout_s=0.5)
    assert state.wait(10) is FAILED and "timed out" in state.error
    assert time.monotonic() - t0 < 5


def test_sink_error_fails_and_double_close_is_fine(ends: tuple) -> None:
    peer, rx = ends
    info = rx.connect_info(peer.endpoint)

    def sink(c: memoryview) -> None:
        raise ValueError("checksum mismatch")

    state = rx.recv(TransferId("bad"), peer.endpoint, sink, 10)
    peer.send("bad", info, 10 << 10, chunk=1 << 10)
    assert state.wait(15) is FAILED and "checksum mismatch" in state.error
    rx.close()
    rx.close()
    after = rx.recv(TransferId("late"), peer.endpoint, lambda c: None, 1)
    assert after.status() is FAILED


def test_cancel_mid_transfer_stops_receiving(ends: tuple) -> None:
    peer, rx = ends
    info = rx.connect_info(peer.endpoint)
    state, got = _recv(rx, peer, "c", timeout_s=20)
    peer.send("c", info, 100 << 10, chunk=1 << 10, delay_s=0.005)
    while not got:
        time.sleep(0.005)
    state.cancel("aborted")
    n = len(got)
    time.sleep(0.2)
    assert state.status() is FAILED and state.error == "aborted"
    assert len(got) <= n + 1  # at most the chunk already inside the sink


@pytest.mark.parametrize("name", ["loopback", "grpc"])
def test_failing_source_fails_both_ends(name: str) -> None:
    tx, rx = make_transport(name, LOCAL).start(), make_transport(name, LOCAL, serve=False).start()

    def source() -> Iterator[bytes]:
        yield b"abc"
        raise TimeoutError("layer 3 was never written")

    state, got = _recv(rx, type("P", (), {"endpoint": tx.endpoint()}), "f")
    send = tx.send(TransferId("f"), source(), "", 10)
    assert state.wait(10) is FAILED and "never written" in state.error
    assert send.wait(10) is FAILED
    threading.Thread(target=tx.close).start()
    rx.close()


def _torch_pair() -> tuple[object, object, str]:
    tx, rx = make_transport("torch", LOCAL, pair_timeout_s=30).start(), make_transport("torch", LOCAL, pair_timeout_s=30).start()
    return tx, rx, rx.connect_info(tx.endpoint())


def test_torch_source_error_fails_one_transfer_and_the_pair_lives_on() -> None:
    """A RuntimeError from the chunk source (not from gloo) fails that transfer only; the pipelined
    sender keeps the pair, so the next transfer on it is bit-exact."""
    tx, rx, info = _torch_pair()

    def source() -> Iterator[bytes]:
        yield b"abc"
        raise RuntimeError("layer 3 was never written")

    try:
        bad, _ = _recv(rx, type("P", (), {"endpoint": tx.endpoint()}), "f")
        send = tx.send(TransferId("f"), source(), info, 10)
        assert bad.wait(10) is FAILED and "never written" in bad.error
        assert send.wait(10) is FAILED and "never written" in send.error
        good, got = _recv(rx, type("P", (), {"endpoint": tx.endpoint()}), "g")
        data = payload(5 << 20, 7)
        assert tx.send(TransferId("g"), chunked(data, 1 << 20), info, 10).wait(10) is DONE
        assert good.wait(10) is DONE and b"".join(got) == data
    finally:
        rx.close()
        tx.close()


def test_torch_cancel_while_the_source_blocks_ends_both_sides() -> None:
    """The source runs on a feeder thread: cancelling the send while the source waits (layer-wise
    streaming before a layer is ready) ends the transfer at once and tells the receiver."""
    tx, rx, info = _torch_pair()
    gate = threading.Event()

    def source() -> Iterator[bytes]:
        yield b"first"
        gate.wait(10)
        yield b"late"

    try:
        state, got = _recv(rx, type("P", (), {"endpoint": tx.endpoint()}), "s")
        send = tx.send(TransferId("s"), source(), info, 10)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        send.cancel("aborted")
        assert state.wait(5) is FAILED and state.error == "aborted"
        assert time.monotonic() - t0 < 2
        assert got == [b"first"]
    finally:
        gate.set()
        rx.close()
        tx.close()
