"""Launch-time reachability of KV endpoints: can this node open a TCP connection to each one?

A wrong advertised address, a firewall or NAT between node types otherwise shows up only as
failed pulls at run time. Decode instances call `unreachable` on every prefill instance's endpoints
before the deployment reports ready, and launch fails with the messages it returns.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pdserve.kvtransfer.types import PeerAddr


@dataclass(frozen=True)
class Endpoint:
    """One listening KV endpoint of a prefill instance, as decode dials it."""

    worker_id: str
    node_ip: str  # the node the instance runs on (Ray's view)
    kind: str  # "control" | "data"
    addr: str  # "host:port" as advertised


def endpoints(worker_id: str, node_ip: str, peers: list[PeerAddr]) -> list[Endpoint]:
    """Every socket endpoint of an instance's ranks (a torch data endpoint is a name, not a socket:
    its pairs are dialled the other way, prefill to decode)."""
    out = []
    for p in peers:
        out.append(Endpoint(worker_id, node_ip, "control", p.control))
        if _split(p.data) is not None:
            out.append(Endpoint(worker_id, node_ip, "data", p.data))
    return out


def unreachable(targets: list[Endpoint], timeout_s: float) -> list[str]:
    """A message for each endpoint this process cannot connect to within `timeout_s`."""
    if not targets:
        return []
    with ThreadPoolExecutor(min(16, len(targets))) as pool:
        errors = list(pool.map(lambda e: _try(e, timeout_s), targets))
    return [e for e in errors if e is not None]


def _try(e: Endpoint, timeout_s: float) -> str | None:
    host, port = _split(e.addr) or ("", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        why = f"timed out after {timeout_s:g} s" if isinstance(err, TimeoutError) else str(err)
        return (f"{e.worker_id}'s KV {e.kind} endpoint {host} port {port} (on node {e.node_ip}) is "
                f"unreachable: {why}")


def _split(addr: str) -> tuple[str, int] | None:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)
