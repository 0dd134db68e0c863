"""A pull whose KV comes from several source ranks (prefill TP) fails as soon as one rank's share
fails, and a receive thread that raises fails its transfer at once: neither waits for the pull's
timeout. Loopback transport, synthetic pools."""

from __future__ import annotations

import torch

from pdserve.config import KVTransferConfig
from pdserve.engine.kv_cache import BlockAllocator, KVLayout, KVPool
from pdserve.kvtransfer.factories import make_receiver, make_sender, make_transport
from pdserve.kvtransfer.faults import FaultyTransport, KVFault
from pdserve.kvtransfer.transfer import TransferState
from pdserve.kvtransfer.transport_loopback import LoopbackTransport
from pdserve.kvtransfer.types import KVHandle, Span, TransferStatus, merge_handles
from tests.net import LOCAL

L, H, D, N = 2, 4, 8, 19
TIMEOUT_S = 60.0  # far beyond what any assertion below waits: a pull that waits for it fails the test


def _pool(heads: int) -> tuple[KVPool, BlockAllocator]:
    pool = KVPool(KVLayout(L, heads, D, 4), 32)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(heads)))
    return pool, BlockAllocator(32)


def _tp2_handle(cfg: KVTransferConfig, faults: list[KVFault], closing: list) -> KVHandle:
    """One export of N tokens split over two prefill ranks (heads 0-1, 2-3), rank r's sends hit by faults[r]."""
    handles = []
    for rank, fault in enumerate(faults):
        pool, alloc = _pool(H // 2)
        transport = FaultyTransport(make_transport("loopback", LOCAL), fault)
        tx = make_sender(cfg, pool, alloc, listen=LOCAL, transport=transport, layers=Span(0, L),
                         heads=Span(rank * H // 2, (rank + 1) * H // 2)).with_model_shape(L, H)
        closing.append(tx)
        handles.append(tx.export("r1", alloc.allocate(pool.layout.num_blocks_for(N)), N, handle_id="h-r1"))
    return merge_handles(handles)


def test_one_rank_failing_fails_the_tp_pull_at_once(closing: list) -> None:
    cfg = KVTransferConfig(transport="loopback", codec="raw", timeout_s=TIMEOUT_S, lease_s=120)
    # rank 0 stalls (its share never arrives); rank 1's first chunk is corrupted (its share fails at once)
    handle = _tp2_handle(cfg, [KVFault(kind="stall", stall_s=TIMEOUT_S * 2), KVFault(kind="corrupt")], closing)
    pool, alloc = _pool(H)
    rx = make_receiver(cfg, pool, listen=LOCAL)
    closing.append(rx)
    xfer = rx.pull(handle, alloc.allocate(pool.layout.num_blocks_for(N)))
    assert rx.wait(xfer, 10) is TransferStatus.FAILED  # not after the 60 s timeout
    status, error = rx.poll(xfer)
    assert status is TransferStatus.FAILED and error is not None and "timed out" not in error, error
    assert handle.shards[1].peer.data in error, error  # names the rank whose share failed


class _RaisingLoopback(LoopbackTransport):
    def _pull(self, state: TransferState, peer: str, sink: object, timeout_s: float) -> None:
        raise RuntimeError("receive thread bug")


def test_a_receive_thread_that_raises_fails_its_transfer_at_once() -> None:
    transport = _RaisingLoopback()
    transport.start()
    try:
        state = transport.recv("x1", "nowhere", lambda chunk: None, TIMEOUT_S)
        assert state.wait(10) is TransferStatus.FAILED
        assert "RuntimeError: receive thread bug" in (state.error or ""), state.error
    finally:
        transport.close()
