"""Tensor-level transports: move a list of tensors between the two ends of one (prefill, decode) pair,
on whatever device they live, without the byte wire's host copy.

    TensorTransport.send(tensors)   sender: tensors on its device (KV slabs, or a codec's parts)
    TensorTransport.recv(out)       receiver: fills preallocated tensors of the same shapes/dtypes

Shapes and dtypes are agreed beforehand (the control message carries the handle's layout), so
only payload moves. Two kinds, chosen by where the pair sits and what it holds:

    group   a 2-rank process group of its own, created once per pair and reused for every transfer:
            NCCL point-to-point for CUDA tensors (between two GPUs), gloo for CPU tensors
            (pair_group.py)
    ipc     CUDA IPC, for a pair on one node: the sender exports a handle to its device memory, the
            receiver maps it and copies device to device; handles travel as JSON over the pair's
            store, never pickle (ipc.py)

The torch byte `Transport` opens one of these per pair as its tensor lane (`kvtransfer.tensor_lane`,
torch_link.py), so KVSender/KVReceiver move KV tensors through it; grpc stays the portable path.

NCCL ordering: a rank's step thread issues its own collectives (TP all-reduce, PP send/recv) on the
same GPU. Two threads enqueueing NCCL kernels on different communicators in different orders on
two ranks can deadlock, so every transport call holds `lock`, which the wiring shares with the
step thread's collectives (one lock per process; `threading.RLock()` when nothing else issues
collectives).
"""

from __future__ import annotations

import datetime
import threading
from typing import Literal, Protocol, Sequence

import torch
import torch.distributed as dist

TensorTransportKind = Literal["group", "ipc"]
COLLECTIVE_LOCK = threading.RLock()
"""The process's lock for enqueueing NCCL work: the torch transport's NCCL lanes post under it, and a
step thread that issues its own NCCL collectives (TP all-reduce, PP send/recv) should hold it while
it enqueues them, so the two never interleave half-posted operations on one GPU."""


class TensorTransport(Protocol):
    """One end of one pair. Calls block until the tensors moved (or raise); one call at a time per pair."""

    name: str

    def send(self, tensors: Sequence[torch.Tensor]) -> None:
        """Deliver `tensors` to the peer's next `recv`, in order."""
        ...

    def post_send(self, tensors: Sequence[torch.Tensor]) -> list[dist.Work]:
        """Start `send` and return what to wait on (the tensors stay untouched until then); an empty
        list when the call already completed the send. Lets a caller keep several sends in flight."""
        ...

    def recv(self, out: Sequence[torch.Tensor]) -> None:
        """Fill `out` (same shapes and dtypes as the peer's `send`) in place."""
        ...

    def close(self) -> None:
        """Release the pair's communicator/handles. Idempotent."""
        ...


def pair_store(host: str, port: int, is_receiver: bool, timeout_s: float) -> dist.TCPStore:
    """The pair's rendezvous: the receiver hosts it (port 0: any free port; read `.port`), the sender joins."""
    return dist.TCPStore(host, port, 2, is_receiver, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def open_pair(kind: TensorTransportKind, store: dist.Store, is_receiver: bool, device: torch.device,
              timeout_s: float, lock: threading.RLock | None = None, host: str | None = None) -> TensorTransport:
    """One end of a pair of `kind` for tensors on `device` (the two ends call it with the same store).
    `host`: the local address a gloo group binds (None: whatever the hostname resolves to)."""
    from pdserve.kvtransfer.ipc import CudaIpcPair
    from pdserve.kvtransfer.pair_group import GroupPair

    lock = lock or threading.RLock()
    if kind == "ipc":
        return CudaIpcPair(store, is_receiver, device, timeout_s, lock)
    return GroupPair(store, is_receiver, device, timeout_s, lock, host)
