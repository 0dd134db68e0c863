"""KVSender/KVReceiver over every transport: pull into other blocks, release, abort, lease, reshard,
layer-wise streaming. Pools are synthetic (random KV); the intersection math is what is tested."""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.config import KVTransferConfig
from pdserve.engine.kv_cache import BlockAllocator, KVLayout, KVPool
from pdserve.kvtransfer.factories import make_receiver, make_sender
from pdserve.kvtransfer.options import SenderOptions
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.reshard import gather_slab, token_slots
from pdserve.kvtransfer.sender import KVSender
from pdserve.kvtransfer.types import KVHandle, Span, TransferStatus, merge_handles
from tests.net import LOCAL

DONE, FAILED = TransferStatus.DONE, TransferStatus.FAILED
L, H, D = 4, 4, 16


def _pool(layers: int = L, heads: int = H, block_size: int = 8, num_blocks: int = 64, seed: int = 0
          ) -> tuple[KVPool, BlockAllocator]:
    pool = KVPool(KVLayout(layers, heads, D, block_size), num_blocks)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return pool, BlockAllocator(num_blocks)


def _kv(pool: KVPool, blocks: list[int], n: int) -> torch.Tensor:
    """(layers, 2, n, heads, D) of a request's KV."""
    slots = token_slots(blocks, pool.layout.block_size, n, pool.device)
    return torch.stack([gather_slab(pool, i, slots, slice(None)) for i in range(pool.layout.num_layers)])


@pytest.fixture(params=["loopback", "grpc", "torch"])
def cfg(request: pytest.FixtureRequest) -> KVTransferConfig:
    return KVTransferConfig(transport=request.param, codec="raw", lease_s=60, timeout_s=10)


def _wait(rx: KVReceiver, xfer: str) -> tuple[TransferStatus, str | None]:
    rx.wait(xfer, 20)
    return rx.poll(xfer)


def _drain(tx: KVSender, n: int = 1, timeout_s: float = 5.0) -> None:
    """Step-loop stand-in: poll until `n` exports are freed (the release RPC is asynchronous)."""
    deadline, freed = time.monotonic() + timeout_s, 0
    while freed < n and time.monotonic() < deadline:
        freed += len(tx.poll())
        time.sleep(0.01)
    assert freed == n, f"{freed} of {n} exports freed"


def test_pull_into_other_block_size_then_release(cfg: KVTransferConfig, closing: list) -> None:
    (sp, sa), (dp, da) = _pool(block_size=8), _pool(block_size=4, seed=1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    closing += [rx, tx]
    blocks = sa.allocate(5)
    handle = tx.export("r1", blocks, 37)
    sa.free(blocks)  # the engine drops its own reference; the export keeps them
    assert sa.num_free == 64 - 5
    dst = da.allocate(10)
    xfer = rx.pull(handle, dst)
    assert _wait(rx, xfer) == (DONE, None)
    assert torch.equal(_kv(dp, dst, 37), _kv(sp, blocks, 37))
    _drain(tx)
    assert sa.num_free == 64 and tx.num_exports == 0
    sa.check_integrity()


def test_abort_mid_transfer_frees_blocks_on_both_sides(cfg: KVTransferConfig, closing: list) -> None:
    (sp, sa), (dp, da) = _pool(), _pool(seed=1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    closing += [rx, tx]
    blocks = sa.allocate(4)
    handle = tx.export("r1", blocks, 30, streaming=True)  # layers not written yet: the pull stalls
    sa.free(blocks)
    tx.layer_hook(0)  # layer 0 goes out, layer 1 never comes
    dst = da.allocate(4)
    xfer = rx.pull(handle, dst)
    deadline = time.monotonic() + 10
    while not torch.equal(_kv(dp, dst, 30)[0], _kv(sp, blocks, 30)[0]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rx.poll(xfer)[0] is TransferStatus.IN_FLIGHT
    rx.abort(xfer)
    assert rx.poll(xfer) == (FAILED, "aborted")
    da.free(dst)  # safe: nothing writes after abort() returns
    assert da.num_free == 64
    _drain(tx)
    assert sa.num_free == 64


def test_lease_frees_blocks_nobody_pulled(closing: list) -> None:
    now = [0.0]
    sp, sa = _pool()
    from pdserve.kvtransfer.transport_loopback import LoopbackTransport

    tx = KVSender(sp, sa, LoopbackTransport(), SenderOptions(listen=LOCAL, lease_s=5, timeout_s=5), clock=lambda: now[0])
    with pytest.raises(RuntimeError, match="start"):
        tx.address  # the constructor opens nothing
    tx.start()
    closing.append(tx)
    blocks = sa.allocate(2)
    tx.export("r1", blocks, 10)
    sa.free(blocks)
    assert tx.poll() == [] and sa.num_free == 62
    now[0] = 6.0
    assert len(tx.poll()) == 1 and sa.num_free == 64


def test_bad_handles_fail_as_values(cfg: KVTransferConfig, closing: list) -> None:
    (sp, sa), (dp, _) = _pool(), _pool()
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    closing += [rx, tx]
    handle = tx.export("r1", sa.allocate(2), 10)
    assert rx.poll(rx.pull(handle, [0]))[0] is FAILED  # too few destination blocks
    tx.release(handle.handle_id)
    _drain(tx)
    status, error = _wait(rx, rx.pull(handle, [0, 1]))  # released: prefill no longer has it
    assert status is FAILED and "not exported" in error


def test_sender_gone_fails_the_pull(cfg: KVTransferConfig, closing: list) -> None:
    (sp, sa), (dp, _) = _pool(), _pool()
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg.__class__(**{**cfg.__dict__, "timeout_s": 3}), dp, listen=LOCAL)
    closing.append(rx)
    handle = tx.export("r1", sa.allocate(2), 10)
    tx.close()
    status, error = _wait(rx, rx.pull(handle, [0, 1]))
    assert status is FAILED and error


def test_layerwise_streaming_ships_layers_as_they_are_written(cfg: KVTransferConfig, closing: list) -> None:
    (sp, sa), (dp, da) = _pool(), _pool(seed=1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    closing += [rx, tx]
    blocks = sa.allocate(3)
    handle = tx.export("r1", blocks, 20, streaming=True)
    dst = da.allocate(3)
    xfer = rx.pull(handle, dst)  # decode may pull before prefill has finished
    for layer in range(L):
        time.sleep(0.05)
        assert rx.poll(xfer)[0] is not DONE
        tx.layer_hook(layer)
    assert _wait(rx, xfer) == (DONE, None)
    assert torch.equal(_kv(dp, dst, 20), _kv(sp, blocks, 20))


def test_releasing_a_streaming_export_mid_pull_fails_the_pull_and_frees_it(cfg: KVTransferConfig, closing: list) -> None:
    """The forward that was to write a streaming export failed: `release` cancels the send that waits
    for the next layer (the pull fails at once, not at its timeout), and a later pull is refused."""
    (sp, sa), (dp, da) = _pool(), _pool(seed=1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    closing += [rx, tx]
    blocks = sa.allocate(3)
    handle = tx.export("r1", blocks, 20, streaming=True)
    sa.free(blocks)
    dst = da.allocate(3)
    xfer = rx.pull(handle, dst)
    tx.layer_hook(0)
    deadline = time.monotonic() + 10
    while not rx.nbytes(xfer) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rx.nbytes(xfer) and rx.poll(xfer)[0] is TransferStatus.IN_FLIGHT  # layer 0 arrived, layer 1 pending
    started = time.monotonic()
    tx.release(handle.handle_id)
    status, error = _wait(rx, xfer)
    assert status is FAILED and error and time.monotonic() - started < cfg.timeout_s / 2
    status, error = _wait(rx, rx.pull(handle, da.allocate(3)))
    assert status is FAILED and "not exported" in (error or "")
    _drain(tx)
    assert sa.num_free == 64 and tx.num_exports == 0


@pytest.mark.parametrize("codec", ["int8", "int4_zstd"])
def test_lossy_codec_through_sender_and_receiver(codec: str, closing: list) -> None:
    cfg = KVTransferConfig(transport="grpc", codec=codec, timeout_s=10)
    (sp, sa), (dp, da) = _pool(), _pool(seed=1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    closing += [rx, tx]
    blocks, dst = sa.allocate(8), da.allocate(8)
    assert _wait(rx, rx.pull(tx.export("r1", blocks, 64), dst)) == (DONE, None)
    a, b = _kv(sp, blocks, 64), _kv(dp, dst, 64)
    assert ((a - b).norm() / a.norm()) < (0.01 if codec == "int8" else 0.2)


# ---- resharding: prefill (TP, PP) -> decode (TP, PP), synthetic shards of one "global" KV ----------

def _shard_senders(cfg: KVTransferConfig, tp: int, pp: int, full: torch.Tensor, n: int, closing: list
                   ) -> KVHandle:
    """Split global KV `full` (L, 2, n, H, D) over tp x pp sender pools; return the merged handle."""
    handles = []
    for stage in range(pp):
        layers = Span(stage * L // pp, (stage + 1) * L // pp)
        for rank in range(tp):
            heads = Span(rank * H // tp, (rank + 1) * H // tp)
            pool, alloc = _pool(len(layers), len(heads), seed=99)
            blocks = alloc.allocate(pool.layout.num_blocks_for(n))[::-1]  # any block order
            slots = token_slots(blocks, pool.layout.block_size, n, pool.device)
            for i, layer in enumerate(range(layers.start, layers.stop)):
                pool.kv[i].flatten(1, 2)[:, slots] = full[layer][:, :, heads.start:heads.stop]
            tx = make_sender(cfg, pool, alloc, layers=layers, heads=heads, listen=LOCAL).with_model_shape(L, H)
            closing.append(tx)
            handles.append(tx.export("r1", blocks, n, handle_id="h-r1"))
    return merge_handles(handles)


@pytest.mark.parametrize("src,dst", [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 2), (1, 1)),
                                     ((2, 2), (4, 1)), ((4, 1), (1, 2))])
def test_resharding_between_layouts(src: tuple[int, int], dst: tuple[int, int], closing: list) -> None:
    cfg = KVTransferConfig(transport="loopback", codec="raw", timeout_s=10)
    n = 21
    full = torch.randn(L, 2, n, H, D, generator=torch.Generator().manual_seed(5))
    handle = _shard_senders(cfg, *src, full, n, closing)
    tp, pp = dst
    for stage in range(pp):
        layers = Span(stage * L // pp, (stage + 1) * L // pp)
        for rank in range(tp):
            heads = Span(rank * H // tp, (rank + 1) * H // tp)
            pool, alloc = _pool(len(layers), len(heads), block_size=4, seed=7)
            rx = make_receiver(cfg, pool, layers=layers, heads=heads, listen=LOCAL)
            closing.append(rx)
            blocks = alloc.allocate(pool.layout.num_blocks_for(n))
            assert _wait(rx, rx.pull(handle, blocks)) == (DONE, None)
            want = full[layers.start:layers.stop, :, :, heads.start:heads.stop]
            assert torch.equal(_kv(pool, blocks, n), want)
