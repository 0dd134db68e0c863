"""A transport sender in another process, driven over a pipe (the torch/gloo conformance runs)."""

from __future__ import annotations

import os
import threading
import time
from multiprocessing.connection import Connection
from typing import Iterator


def payload(nbytes: int, seed: int) -> bytes:
    """Deterministic bytes both processes can rebuild."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).numpy().tobytes()


def chunked(data: bytes, size: int, delay_s: float = 0.0) -> Iterator[bytes]:
    for off in range(0, len(data), size):
        if delay_s:
            time.sleep(delay_s)
        yield data[off:off + size]


def serve(conn: Connection) -> None:
    """Commands: ("send", xfer, info, nbytes, seed, chunk, delay_s, timeout_s), answered later by
    (xfer, status, error);
    ("die",) exits at once without cleanup; ("close",) closes the transport and exits."""
    import torch

    torch.set_num_threads(1)
    from pdserve.kvtransfer.transport_torch import TorchTransport
    from tests.net import LOCAL

    t = TorchTransport(LOCAL, pair_timeout_s=30).start()
    lock = threading.Lock()
    conn.send(t.endpoint())

    def report(xfer: str, state: object, timeout_s: float) -> None:
        state.wait(timeout_s + 5)
        with lock:
            conn.send((xfer, state.status().value, state.error))

    while True:
        cmd = conn.recv()
        if cmd[0] == "send":
            _, xfer, info, nbytes, seed, chunk, delay_s, timeout_s = cmd
            state = t.send(xfer, chunked(payload(nbytes, seed), chunk, delay_s), info, timeout_s)
            threading.Thread(target=report, args=(xfer, state, timeout_s), daemon=True).start()
        elif cmd[0] == "die":
            os._exit(0)
        else:
            t.close()
            with lock:
                conn.send("closed")
            return
