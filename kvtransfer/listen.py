"""`Listen`: where a KV endpoint binds and the address it advertises to peers on other nodes.

Every listening socket of kvtransfer (the control service, the gRPC data service, the torch
transport's TCPStore and gloo pair) is opened through one `Listen`. The role actors resolve it
from the serving config and the Ray node IP of their node (`Listen.resolve`), so a peer on another
machine dials an address that leads here, never its own loopback.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, TypeVar

from pdserve.config import KVTransferConfig

T = TypeVar("T")
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Listen:
    bind_host: str  # the local address sockets bind (may be a wildcard)
    advertise_host: str  # the address peers dial (never a wildcard)
    port_range: tuple[int, int] | None = None  # (lowest, highest) ports to bind; None: any free port

    def __post_init__(self) -> None:
        if self.advertise_host in WILDCARDS:
            raise ValueError(f"advertise_host: peers cannot dial {self.advertise_host!r}")

    @classmethod
    def on(cls, host: str) -> Listen:
        """Bind and advertise one address (tests, single-machine tools)."""
        return cls(host, host)

    @classmethod
    def resolve(cls, cfg: KVTransferConfig, node_ip: str) -> Listen:
        """The config's overrides over the node's own IP (as Ray knows it)."""
        bind = cfg.bind_host or node_ip
        advertise = cfg.advertise_host or (node_ip if bind in WILDCARDS else bind)
        return cls(bind, advertise, cfg.ports)

    @property
    def local_host(self) -> str:
        """An address of this node that sockets can bind and peers can reach (gloo needs one)."""
        return self.advertise_host if self.bind_host in WILDCARDS else self.bind_host

    def addr(self, port: int) -> str:
        return f"{self.advertise_host}:{port}"

    def bind(self, open_on: Callable[[int], T]) -> T:
        """`open_on(port)` on a free port: 0 (the OS picks) or each port of the range in random
        order. `open_on` raises OSError/RuntimeError when the port is taken."""
        if self.port_range is None:
            return open_on(0)
        lo, hi = self.port_range
        ports = list(range(lo, hi + 1))
        random.shuffle(ports)
        last: Exception | None = None
        for port in ports:
            try:
                return open_on(port)
            except (OSError, RuntimeError) as e:
                last = e
        raise OSError(f"kvtransfer.port_range: no free port in {lo}-{hi} on {self.bind_host} (last error: {last})")
