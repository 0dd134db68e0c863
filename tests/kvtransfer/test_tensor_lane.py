"""The torch transport's tensor lane behind KVSender/KVReceiver: on CPU pools a pull moves each
layer's codec parts as tensors over the pair's gloo group (NCCL on GPUs, same code), and lands
exactly the KV the byte path lands. The lane choice is explicit and never silently degraded."""

from __future__ import annotations

import pytest
import torch

from pdserve.config import KVTransferConfig
from pdserve.engine.kv_cache import BlockAllocator, KVLayout, KVPool
from pdserve.kvtransfer.factories import make_receiver, make_sender
from pdserve.kvtransfer.reshard import gather_slab, token_slots
from pdserve.kvtransfer.torch_link import choose_lane
from pdserve.kvtransfer.types import Span, TransferStatus, merge_handles
from tests.net import LOCAL

L, H, D = 3, 4, 8


def _pool(heads: int = H, block_size: int = 4, seed: int = 0) -> tuple[KVPool, BlockAllocator]:
    pool = KVPool(KVLayout(L, heads, D, block_size), 32)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return pool, BlockAllocator(32)


def _kv(pool: KVPool, blocks: list[int], n: int) -> torch.Tensor:
    slots = token_slots(blocks, pool.layout.block_size, n, pool.device)
    return torch.stack([gather_slab(pool, i, slots, slice(None)) for i in range(L)])


def _pull(lane: str, codec: str, n: int = 29) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Source KV, the KV a torch-transport pull landed, and how many frames came over the lane."""
    cfg = KVTransferConfig(transport="torch", codec=codec, timeout_s=20, tensor_lane=lane)  # type: ignore[arg-type]
    (sp, sa), (dp, da) = _pool(), _pool(block_size=8, seed=1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    try:
        blocks, dst = sa.allocate(8), da.allocate(4)
        xfer = rx.pull(tx.export("r1", blocks, n), dst)
        assert rx.wait(xfer, 30) is TransferStatus.DONE, rx.poll(xfer)
        assert rx.nbytes(xfer) > 0
        return _kv(sp, blocks, n), _kv(dp, dst, n), rx.tensor_frames(xfer)
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize("codec", ["raw", "int8", "int4_zstd"])
def test_a_pull_over_the_gloo_lane_lands_the_same_kv_as_the_byte_path(codec: str) -> None:
    src, by_lane, lane_frames = _pull("auto", codec)
    src2, by_bytes, byte_frames = _pull("off", codec)
    assert torch.equal(src, src2)
    assert (lane_frames, byte_frames) == (L, 0)  # every layer took the lane; none with it off
    assert torch.equal(by_lane, by_bytes)  # same codec output, decoded the same way
    if codec == "raw":
        assert torch.equal(by_lane, src)


def test_one_lane_per_pair_is_made_once_and_reused() -> None:
    cfg = KVTransferConfig(transport="torch", codec="raw", timeout_s=20)
    (sp, sa), (dp, da) = _pool(), _pool(seed=1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    try:
        lanes = []
        for i in range(3):
            xfer = rx.pull(tx.export(f"r{i}", sa.allocate(2), 8), da.allocate(2))
            assert rx.wait(xfer, 30) is TransferStatus.DONE, rx.poll(xfer)
            (pair,) = rx.transport._recv_pairs.values()  # type: ignore[attr-defined]
            lanes.append(pair.tensors)
        assert pair.lane == "gloo" and lanes[0] is lanes[1] is lanes[2]
        assert lanes[0].num_transfers == 3 * L  # one recv per layer, every pull on the same group
    finally:
        rx.close()
        tx.close()


def test_tp2_shards_feed_one_receiver_over_their_lanes() -> None:
    cfg = KVTransferConfig(transport="torch", codec="raw", timeout_s=20, tensor_lane="group")
    n, full = 13, torch.randn(L, 2, 13, H, D, generator=torch.Generator().manual_seed(3))
    senders, handles = [], []
    try:
        for rank in range(2):
            heads = Span(rank * H // 2, (rank + 1) * H // 2)
            pool, alloc = _pool(heads=len(heads), seed=9)
            blocks = alloc.allocate(pool.layout.num_blocks_for(n))
            slots = token_slots(blocks, pool.layout.block_size, n, pool.device)
            for layer in range(L):
                pool.kv[layer].flatten(1, 2)[:, slots] = full[layer][:, :, heads.start:heads.stop]
            senders.append(make_sender(cfg, pool, alloc, heads=heads, listen=LOCAL).with_model_shape(L, H))
            handles.append(senders[-1].export("r1", blocks, n, handle_id="h"))
        dp, da = _pool(block_size=8, seed=4)
        rx = make_receiver(cfg, dp, listen=LOCAL)
        senders.append(rx)
        dst = da.allocate(2)
        xfer = rx.pull(merge_handles(handles), dst)
        assert rx.wait(xfer, 30) is TransferStatus.DONE, rx.poll(xfer)
        assert rx.tensor_frames(xfer) == 2 * L and torch.equal(_kv(dp, dst, n), full)
    finally:
        for end in reversed(senders):
            end.close()


def test_a_lane_the_pair_cannot_have_fails_the_pull_with_the_reason() -> None:
    cfg = KVTransferConfig(transport="torch", timeout_s=5, tensor_lane="ipc")
    (sp, sa), (dp, da) = _pool(), _pool(seed=1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    try:
        xfer = rx.pull(tx.export("r1", sa.allocate(2), 8), da.allocate(2))
        assert rx.wait(xfer, 10) is TransferStatus.FAILED
        assert "tensor_lane ipc needs both pools on CUDA" in (rx.poll(xfer)[1] or "")
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize("info,device,want", [
    ("10.0.0.1:5/n/auto:cpu", "cpu", "gloo"),
    ("10.0.0.1:5/n/auto:cuda", "cuda:1", "nccl"),
    ("10.0.0.1:5/n/group:cuda", "cuda:0", "nccl"),
    ("10.0.0.1:5/n/auto:cuda", "cpu", None),  # mixed devices under auto: bytes, by design
    ("10.0.0.1:5/n/off:cpu", "cpu", None),
    ("10.0.0.1:5/n/ipc:cuda", "cuda:0", "ipc"),
])
def test_lane_choice(info: str, device: str, want: str | None) -> None:
    assert choose_lane(info, torch.device(device), "10.0.0.1") == want


@pytest.mark.parametrize("info,host,error", [
    ("10.0.0.1:5/n/group:cuda", "10.0.0.1", "tensor_lane group needs both pools on one device type"),
    ("10.0.0.1:5/n/ipc:cuda", "10.0.0.2", "tensor_lane ipc needs both pools on CUDA on one node"),
])
def test_impossible_lanes_are_errors(info: str, host: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        choose_lane(info, torch.device("cpu" if "group" in info else "cuda:0"), host)


# ---- on GPUs: the same pulls with the parts on CUDA, over NCCL (two GPUs) and CUDA IPC (one GPU) ----

def _cuda_pool(device: str, seed: int) -> tuple[KVPool, BlockAllocator]:
    pool = KVPool(KVLayout(L, H, D, 4, dtype="bfloat16"), 32, device=device)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(seed)).to(pool.kv))
    return pool, BlockAllocator(32)


def _ipc_sender(handles: object, done: object) -> None:
    """Child process: a CUDA sender on cuda:0 that exports 8 blocks and serves until `done`."""
    cfg = KVTransferConfig(transport="torch", timeout_s=30, tensor_lane="ipc")
    sp, sa = _cuda_pool("cuda:0", 0)
    tx = make_sender(cfg, sp, sa, listen=LOCAL)
    handles.put(tx.export("r1", list(range(8)), 29))  # type: ignore[attr-defined]
    done.wait(120)  # type: ignore[attr-defined]
    tx.close()


@pytest.mark.gpu
@pytest.mark.parametrize("lane", ["nccl", "ipc"])
def test_a_cuda_pull_over_the_lane_lands_the_kv(lane: str) -> None:
    import torch.multiprocessing as mp

    if lane == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("an NCCL lane needs two GPUs (NCCL refuses two ranks on one)")
    dst_device = "cuda:1" if lane == "nccl" else "cuda:0"
    cfg = KVTransferConfig(transport="torch", timeout_s=30, tensor_lane="group" if lane == "nccl" else "ipc")
    dp, da = _cuda_pool(dst_device, 1)
    rx, ends, proc = make_receiver(cfg, dp, listen=LOCAL), [], None
    try:
        if lane == "nccl":
            sp, sa = _cuda_pool("cuda:0", 0)
            ends.append(make_sender(cfg, sp, sa, listen=LOCAL))
            handle = ends[0].export("r1", list(range(8)), 29)
        else:  # CUDA IPC cannot open a handle in the process that made it: the sender is a child
            ctx = mp.get_context("spawn")
            handles, done = ctx.Queue(), ctx.Event()
            proc = ctx.Process(target=_ipc_sender, args=(handles, done))
            proc.start()
            handle = handles.get(timeout=120)
        dst = da.allocate(8)
        xfer = rx.pull(handle, dst)
        assert rx.wait(xfer, 60) is TransferStatus.DONE, rx.poll(xfer)
        assert rx.tensor_frames(xfer) == L
        want, _ = _cuda_pool(dst_device, 0)
        assert torch.equal(_kv(dp, dst, 29), _kv(want, list(range(8)), 29))
    finally:
        rx.close()
        for end in ends:
            end.close()
        if proc is not None:
            done.set()
            proc.join(60)
