"""The tensor-level transport API (kvtransfer/tensor_transport.py) over gloo with CPU tensors: the
same calls carry CUDA tensors over NCCL or CUDA IPC (gpu-marked tests below and benchmarks/gpu_check.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.engine.kv_cache import KVLayout, KVPool
from pdserve.kvtransfer.reshard import gather_slab, scatter_slab, token_slots
from pdserve.kvtransfer.tensor_transport import TensorTransport, open_pair, pair_store


def _pair(kind: str = "group", device: str = "cpu", lock: Any = None) -> tuple[TensorTransport, TensorTransport]:
    rx_store = pair_store("127.0.0.1", 0, True, 20)
    tx_store = pair_store("127.0.0.1", rx_store.port, False, 20)
    with ThreadPoolExecutor(2) as pool:  # both ends join the group together
        rx = pool.submit(open_pair, kind, rx_store, True, torch.device(device), 20)
        tx = pool.submit(open_pair, kind, tx_store, False, torch.device(device), 20, lock)
        return tx.result(), rx.result()


def _move(tx: TensorTransport, rx: TensorTransport, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for t in tensors]
    sender = threading.Thread(target=tx.send, args=(tensors,))
    sender.start()
    rx.recv(out)
    sender.join(10)
    assert not sender.is_alive()
    return out


def test_one_gloo_pair_carries_many_transfers_of_mixed_dtypes_bit_exactly() -> None:
    tx, rx = _pair()
    try:
        assert tx.name == rx.name == "gloo"
        group = tx.pg  # type: ignore[attr-defined]
        for n in (1, 17, 4096):
            sent = [torch.randn(2, n, 3, 8).to(torch.bfloat16), torch.arange(n, dtype=torch.uint8),
                    torch.randn(n, 2, dtype=torch.float32)]
            got = _move(tx, rx, sent)
            assert all(torch.equal(a, b) for a, b in zip(sent, got))
        assert tx.pg is group and tx.num_transfers == rx.num_transfers == 3  # type: ignore[attr-defined]
    finally:
        tx.close()
        rx.close()


def test_kv_blocks_move_between_pools_of_different_block_sizes() -> None:
    src = KVPool(KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4), 16)
    dst = KVPool(KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=8), 8)
    src.kv.copy_(torch.randn_like(src.kv))
    n = 13
    src_slots, dst_slots = token_slots([5, 2, 9, 0], 4, n, src.device), token_slots([3, 6], 8, n, dst.device)
    tx, rx = _pair()
    try:
        for layer in range(2):
            slab = gather_slab(src, layer, src_slots, slice(0, 2)).contiguous()  # (2, T, H, D)
            (got,) = _move(tx, rx, [slab])
            scatter_slab(dst, layer, dst_slots, slice(0, 2), got)
            torch.testing.assert_close(gather_slab(dst, layer, dst_slots, slice(0, 2)), slab, rtol=0, atol=0)
    finally:
        tx.close()
        rx.close()


def test_a_transfer_waits_for_the_collective_lock_the_step_thread_holds() -> None:
    lock = threading.RLock()
    tx, rx = _pair(lock=lock)
    try:
        lock.acquire()  # the step thread is inside a collective
        done = threading.Event()
        sender = threading.Thread(target=lambda: (tx.send([torch.ones(4)]), done.set()))
        sender.start()
        out = [torch.zeros(4)]
        receiver = threading.Thread(target=rx.recv, args=(out,))
        receiver.start()
        assert not done.wait(0.3)  # the send has not been posted
        lock.release()
        assert done.wait(10)
        receiver.join(10)
        assert torch.equal(out[0], torch.ones(4))
    finally:
        tx.close()
        rx.close()


def test_wrong_device_and_non_contiguous_tensors_are_refused() -> None:
    tx, rx = _pair()
    try:
        with pytest.raises(ValueError, match="gloo pair on cpu: tensor on meta"):
            tx.send([torch.empty(2, device="meta")])
        with pytest.raises(ValueError, match="contiguous"):
            tx.send([torch.ones(4, 4).t()])
    finally:
        tx.close()
        rx.close()
    with pytest.raises(ValueError, match="ipc: a CUDA IPC pair needs a CUDA device"):
        open_pair("ipc", pair_store("127.0.0.1", 0, True, 5), True, torch.device("cpu"), 5)


# ---- on a GPU: the same API over CUDA IPC (one GPU, two processes) and NCCL (two GPUs) ----------

def _ipc_sender(port: int, kind: str, device: str) -> None:
    store = pair_store("127.0.0.1", port, False, 30)
    tx = open_pair(kind, store, False, torch.device(device), 30)  # type: ignore[arg-type]
    g = torch.Generator(device=device).manual_seed(0)
    tx.send([torch.randn(2, 300, 8, 128, device=device, generator=g).to(torch.bfloat16),
             torch.arange(1000, device=device, dtype=torch.uint8)])
    tx.close()


def _expected(device: str) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(2, 300, 8, 128, device=device, generator=g).to(torch.bfloat16),
            torch.arange(1000, device=device, dtype=torch.uint8)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,devices", [("ipc", ("cuda:0", "cuda:0")), ("group", ("cuda:1", "cuda:0"))])
def test_device_tensors_move_between_two_processes(kind: str, devices: tuple[str, str]) -> None:
    if torch.cuda.device_count() < len(set(devices)):
        pytest.skip(f"{kind} across {set(devices)} needs {len(set(devices))} GPUs (NCCL refuses two ranks on one)")
    store = pair_store("127.0.0.1", 0, True, 30)
    proc = mp.get_context("spawn").Process(target=_ipc_sender, args=(store.port, kind, devices[0]))
    proc.start()
    rx = open_pair(kind, store, True, torch.device(devices[1]), 30)  # type: ignore[arg-type]
    want = _expected(devices[1])
    out = [torch.empty_like(t) for t in want]
    rx.recv(out)
    proc.join(60)
    assert proc.exitcode == 0
    assert all(torch.equal(a, b) for a, b in zip(out, want))
