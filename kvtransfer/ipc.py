"""`CudaIpcPair`: a same-node (prefill, decode) pair moves device tensors with CUDA IPC, DistServe's
intra-node path: no host copy, no network, and it works with both ends on one GPU.

Per `send`, for each tensor in order:

    sender    export a CUDA IPC handle of the tensor's memory (torch's reduce_tensor: the handle,
              the storage offset, the producer's ref counter and event) -> JSON -> store key m<seq>
    receiver  read m<seq>, map the memory (torch's rebuild_cuda_tensor: it waits on the producer's
              event), copy it into `out` on its own stream, synchronise, set a<seq>
    sender    wait for a<seq>: only now may the tensor's memory be reused

The handle is described field by field in JSON (bytes as base64, the two classes from a fixed
allow-list); nothing received is unpickled.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.multiprocessing import reductions

_STORAGE_CLASSES = {c.__name__: c for c in (torch.storage.TypedStorage, torch.UntypedStorage)}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int64, torch.float8_e4m3fn)}
_FIELDS = ("cls", "size", "stride", "offset", "storage_cls", "dtype", "device", "handle", "storage_nbytes",
           "storage_offset", "requires_grad", "ref_handle", "ref_offset", "event_handle", "event_sync")


def export_handle(t: torch.Tensor) -> str:
    """JSON description of a CUDA tensor's IPC handle (the tensor must stay alive until the peer acks)."""
    rebuild, args = reductions.reduce_tensor(t)
    if rebuild is not reductions.rebuild_cuda_tensor:
        raise ValueError(f"ipc: only CUDA tensors can be exported, got one on {t.device}")
    d = dict(zip(_FIELDS, args))
    return json.dumps({
        "size": list(d["size"]), "stride": list(d["stride"]), "offset": d["offset"],
        "storage_cls": d["storage_cls"].__name__, "dtype": str(d["dtype"]).removeprefix("torch."),
        "device": d["device"], "handle": _b64(d["handle"]), "storage_nbytes": d["storage_nbytes"],
        "storage_offset": d["storage_offset"], "ref_handle": _b64(d["ref_handle"]), "ref_offset": d["ref_offset"],
        "event_handle": _b64(d["event_handle"]), "event_sync": bool(d["event_sync"])})


def import_handle(text: str) -> torch.Tensor:
    """The peer's tensor, mapped into this process (same device memory, no copy)."""
    h: dict[str, Any] = json.loads(text)
    if h["storage_cls"] not in _STORAGE_CLASSES or h["dtype"] not in _DTYPES:
        raise ValueError(f"ipc: unsupported handle {h['storage_cls']}/{h['dtype']}")
    return reductions.rebuild_cuda_tensor(
        torch.Tensor, torch.Size(h["size"]), tuple(h["stride"]), int(h["offset"]), _STORAGE_CLASSES[h["storage_cls"]],
        _DTYPES[h["dtype"]], int(h["device"]), _unb64(h["handle"]), int(h["storage_nbytes"]),
        int(h["storage_offset"]), False, _unb64(h["ref_handle"]), int(h["ref_offset"]),
        _unb64(h["event_handle"]), bool(h["event_sync"]))


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


class CudaIpcPair:
    name = "ipc"

    def __init__(self, store: dist.Store, is_receiver: bool, device: torch.device, timeout_s: float,
                 lock: threading.RLock) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"ipc: a CUDA IPC pair needs a CUDA device, got {device}")
        self.store, self.device, self.lock = store, torch.device(device), lock
        self.is_receiver, self.seq = is_receiver, 0
        store.set_timeout(datetime.timedelta(seconds=timeout_s))

    def send(self, tensors: Sequence[torch.Tensor]) -> None:
        with self.lock:
            torch.cuda.set_device(self.device)
            first = self.seq
            for t in tensors:
                self.store.set(f"m{self.seq}", export_handle(t))
                self.seq += 1
            for s in range(first, self.seq):
                self.store.get(f"a{s}")  # the receiver has copied: the memory may be reused
                self.store.delete_key(f"a{s}")

    def post_send(self, tensors: Sequence[torch.Tensor]) -> list[Any]:
        """`send` (an IPC send completes when the receiver has copied): nothing left to wait for."""
        self.send(tensors)
        return []

    def recv(self, out: Sequence[torch.Tensor]) -> None:
        with self.lock:
            torch.cuda.set_device(self.device)
            stream = torch.cuda.current_stream(self.device)
            for o in out:
                src = import_handle(self.store.get(f"m{self.seq}").decode())
                self.store.delete_key(f"m{self.seq}")
                if src.shape != o.shape or src.dtype != o.dtype:
                    raise ValueError(f"ipc: peer sent {src.dtype}{list(src.shape)}, expected {o.dtype}{list(o.shape)}")
                o.copy_(src)
                stream.synchronize()  # the copy is done before the sender may reuse the memory
                del src
                self.store.set(f"a{self.seq}", "1")
                self.seq += 1

    def close(self) -> None:
        pass  # handles are per transfer; the store belongs to whoever opened the pair
