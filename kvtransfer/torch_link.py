"""What both ends of a torch-transport pair share: the message kinds, the pair's store keys and
timing constants, its gloo group, and the choice and opening of its tensor lane.

Connect info (the receiver's, handed to the sender): "host:port/nonce/lane:device", where `lane` is
the receiver's `kvtransfer.tensor_lane` (auto | off | group | ipc) and `device` its pool's device type.
"""

from __future__ import annotations

import datetime
import threading
import warnings

import torch
import torch.distributed as dist

from pdserve.kvtransfer.tensor_transport import COLLECTIVE_LOCK, TensorTransport, open_pair

BEGIN, CHUNK, END, ABORT, TENSORS = 1, 2, 3, 4, 5  # TENSORS: a frame header; its parts follow on the lane
DEPTH = 2  # chunks in flight between the two stages of each end's pipeline
POLL_S = 0.05  # how often a stage blocked on its queue checks for cancellation
META_TAG, PAYLOAD_TAG = 0, 1  # separate tags keep each kind in order while several are posted
PEER_POLL_S = 0.1  # how often an end waiting in Python checks the store for the peer's "closed" key
JOIN_S = 5.0  # how long close() waits for a pair's threads (they leave within ~2 polls)
GATE, TX_CLOSED, RX_CLOSED, LANE = "gate", "tx-closed", "rx-closed", "lane"  # store keys, under the pair's nonce
NO_LANE = "bytes"

# gloo only reads a send buffer, so a tensor over the (read-only) bytes of a chunk is safe. torch warns
# about read-only buffers once per process: spend that warning here, silenced, at import.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)


def new_group(store: dist.Store, nonce: str, rank: int, timeout_s: float, host: str) -> dist.ProcessGroup:
    """gloo's default device binds whatever the machine's hostname resolves to (often loopback, or
    an address another network namespace does not have): bind this node's KV address instead."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore(nonce, store), rank, 2, opts)


def has(store: dist.Store, key: str) -> bool:
    """Whether `key` is set; True when the store is unreachable (its host, the receiver, is gone)."""
    try:
        return store.check([key])
    except Exception:  # noqa: BLE001 - any store failure means the pair is over
        return True


def set_key(store: dist.Store | None, key: str, value: str = "1") -> None:
    if store is None:
        return
    try:
        store.set(key, value)
    except Exception:  # noqa: BLE001 - the peer (and its store) is already gone: nothing to tell
        pass


def choose_lane(info: str, device: torch.device, host: str) -> str | None:
    """The tensor lane a sender on `device` (at `host`) uses to the receiver of `info`: "gloo" or
    "nccl" (the pair's own group), "ipc", or None (bytes). ValueError when the receiver asked for a
    lane this pair cannot have (never a silent fallback to bytes)."""
    addr, _, rest = info.partition("/")
    mode, _, rx_type = rest.partition("/")[2].partition(":")
    tx_type = torch.device(device).type
    if mode in ("off", ""):
        return None
    if mode == "ipc":
        if tx_type != "cuda" or rx_type != "cuda" or addr.rsplit(":", 1)[0] != host:
            raise ValueError(f"tensor_lane ipc needs both pools on CUDA on one node (sender {tx_type} at {host}, "
                             f"receiver {rx_type} at {addr})")
        return "ipc"
    if tx_type != rx_type:
        if mode == "group":
            raise ValueError(f"tensor_lane group needs both pools on one device type (sender {tx_type}, "
                             f"receiver {rx_type}); use auto or off")
        return None
    return "nccl" if tx_type == "cuda" else "gloo"


def open_lane(lane: str, store: dist.Store, nonce: str, is_receiver: bool, device: torch.device,
              timeout_s: float, host: str) -> TensorTransport:
    """This end of the pair's tensor lane (both ends call it after forming the byte group). An NCCL
    lane enqueues under the process's COLLECTIVE_LOCK (enqueueing never blocks the CPU); gloo and
    IPC lanes block until the peer answers, so each has its own lock (a shared one could chain
    pairs across processes into a cycle)."""
    kind = "ipc" if lane == "ipc" else "group"
    lock = COLLECTIVE_LOCK if lane == "nccl" else threading.RLock()
    return open_pair(kind, dist.PrefixStore(f"{nonce}/lane", store), is_receiver, device, timeout_s, lock, host)
