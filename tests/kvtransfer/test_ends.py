"""The two ends as the workers see them: KVSender/KVReceiver satisfy KVSource/KVSink, their
constructors open nothing until start(), and transports come from a registry."""

from __future__ import annotations

import threading

import pytest
import torch

from pdserve.config import KVTransferConfig
from pdserve.engine.kv_cache import BlockAllocator, KVLayout, KVPool
from pdserve.kvtransfer import factories
from pdserve.kvtransfer.factories import TransportOptions, make_receiver, make_sender, make_transport, register_transport
from pdserve.kvtransfer.options import ReceiverOptions, SenderOptions
from pdserve.kvtransfer.protocols import BlockRefs, KVSink, KVSource
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.sender import KVSender
from pdserve.kvtransfer.transport_loopback import LoopbackTransport
from tests.net import LOCAL


def _pool() -> tuple[KVPool, BlockAllocator]:
    return KVPool(KVLayout(2, 2, 8, 4), 8), BlockAllocator(8)


def test_sender_and_receiver_satisfy_the_worker_protocols() -> None:
    (sp, sa), (dp, _) = _pool(), _pool()
    cfg = KVTransferConfig(transport="loopback")
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    try:
        assert isinstance(tx, KVSource) and isinstance(rx, KVSink) and isinstance(sa, BlockRefs)
        assert not isinstance(rx, KVSource) and not isinstance(tx, KVSink)
    finally:
        rx.close()
        tx.close()


def test_constructors_open_nothing_until_start() -> None:
    (sp, sa), (dp, _) = _pool(), _pool()
    before = set(threading.enumerate())  # by identity: an earlier test's thread may end meanwhile
    tx = KVSender(sp, sa, make_transport("grpc", LOCAL), SenderOptions(listen=LOCAL, timeout_s=5))
    rx = KVReceiver(dp, make_transport("torch", LOCAL), ReceiverOptions(timeout_s=5))
    assert not set(threading.enumerate()) - before  # no server, no pool threads
    with pytest.raises(RuntimeError, match="start"):
        tx.address
    with pytest.raises(RuntimeError, match="start"):
        rx.pull(None, [0])  # type: ignore[arg-type]
    try:
        assert tx.start() is tx and tx.start() is tx  # idempotent
        assert tx.address.control.startswith("127.0.0.1:") and tx.address.data.startswith("127.0.0.1:")
        assert set(threading.enumerate()) - before
        assert rx.start() is rx
    finally:
        rx.close()
        tx.close()


def test_options_come_from_the_config() -> None:
    cfg = KVTransferConfig(lease_s=7, timeout_s=3, codec="int8")
    assert SenderOptions.from_config(cfg, LOCAL) == SenderOptions(listen=LOCAL, lease_s=7, timeout_s=3)
    assert ReceiverOptions.from_config(cfg) == ReceiverOptions(timeout_s=3, codec="int8")
    with pytest.raises(Exception):
        SenderOptions(listen=LOCAL).lease_s = 1  # type: ignore[misc]  # frozen


def test_the_transport_registry() -> None:
    with pytest.raises(ValueError, match="unknown transport 'carrier-pigeon' \\(known: loopback, grpc, torch"):
        make_transport("carrier-pigeon", LOCAL)
    with pytest.raises(ValueError, match="already registered"):
        register_transport("grpc", lambda o: LoopbackTransport())
    seen: list[TransportOptions] = []
    register_transport("test-loop", lambda o: seen.append(o) or LoopbackTransport())
    try:
        t = make_transport("test-loop", LOCAL, pair_timeout_s=9.0)
        assert isinstance(t, LoopbackTransport) and seen[0].pair_timeout_s == 9.0 and seen[0].listen == LOCAL
    finally:
        del factories._TRANSPORTS["test-loop"]
