"""`GroupPair`: a (prefill, decode) pair's own 2-rank process group, NCCL for CUDA tensors and gloo
for CPU tensors, created once and reused for every transfer of the pair.

Rank 0 sends, rank 1 (the receiver, which hosts the store) receives. On CUDA, NCCL creates the
pair's communicator on the first transfer and the group keeps it for every later one; the two ends
must be on different GPUs (NCCL refuses two ranks on one GPU: use `ipc` there). Each call holds the
process's collective lock (tensor_transport.py) and binds the calling thread to the pair's device
(the current device is per thread); on CUDA the caller's stream waits for the NCCL work before
anyone reads `out`.
"""

from __future__ import annotations

import datetime
import threading
import uuid
from typing import Sequence

import torch
import torch.distributed as dist

_SENDER, _RECEIVER = 0, 1


class GroupPair:
    def __init__(self, store: dist.Store, is_receiver: bool, device: torch.device, timeout_s: float,
                 lock: threading.RLock, host: str | None = None) -> None:
        """`host`: the local address gloo binds (None: the hostname's address)."""
        self.device, self.lock = torch.device(device), lock
        self.rank = _RECEIVER if is_receiver else _SENDER
        self.name = "nccl" if self.device.type == "cuda" else "gloo"
        self.num_transfers = 0
        prefix = dist.PrefixStore(f"pair/{_nonce(store, is_receiver)}", store)
        timeout = datetime.timedelta(seconds=timeout_s)
        if self.device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg: dist.ProcessGroup = dist.ProcessGroupNCCL(prefix, self.rank, 2, opts)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host) if host
                             else dist.ProcessGroupGloo.create_default_device()]
            self.pg = dist.ProcessGroupGloo(prefix, self.rank, 2, opts)

    def send(self, tensors: Sequence[torch.Tensor]) -> None:
        for w in self.post_send(tensors):
            w.wait()  # NCCL: the current stream now waits for the transfer

    def post_send(self, tensors: Sequence[torch.Tensor]) -> list[dist.Work]:
        """Post the sends and return at once; the tensors must stay alive and unchanged until every
        returned work's `wait()` returned. Sends posted by successive calls arrive in order."""
        return self._post(tensors, lambda t, i: self.pg.send([t], _RECEIVER, i))

    def recv(self, out: Sequence[torch.Tensor]) -> None:
        for w in self._post(out, lambda t, i: self.pg.recv([t], _SENDER, i)):
            w.wait()

    def _post(self, tensors: Sequence[torch.Tensor], post: object) -> list[dist.Work]:
        for t in tensors:
            if t.device != self.device and not (t.device.type == self.device.type == "cpu"):
                raise ValueError(f"{self.name} pair on {self.device}: tensor on {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"{self.name} pair: tensors must be contiguous")
        with self.lock:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            works = [post(t, i) for i, t in enumerate(tensors)]  # type: ignore[operator]
        self.num_transfers += 1
        return works

    def close(self) -> None:
        pg, self.pg = getattr(self, "pg", None), None  # type: ignore[assignment]
        if pg is not None and self.device.type == "cuda":
            pg.shutdown()


def _nonce(store: dist.Store, is_receiver: bool) -> str:
    """A fresh id per pair (the receiver picks it), so a rebuilt pair never meets an old one's keys."""
    if is_receiver:
        store.set("pair-nonce", uuid.uuid4().hex[:12])
    return store.get("pair-nonce").decode()
