"""Launch-time reachability of KV endpoints: can this node open a TCP connection to each one?

A wrong advertised address, a firewall or NAT between node types otherwise shows up only as
failed pulls at run time. Before the deployment reports ready, decode instances dial every prefill
instance's endpoints, and (torch transport, whose pairs prefill dials) prefill instances dial a
probe socket on each decode instance; launch fails with the messages `unreachable` returns.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pdserve.kvtransfer.listen import Listen
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


def probe_socket(listen: Listen) -> socket.socket:
    """A socket listening where an endpoint of `listen` would (its address, its port range)."""
    def open_on(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in listen.bind_host else socket.AF_INET)
        try:
            s.bind((listen.bind_host, port))
            s.listen(16)
        except OSError:
            s.close()
            raise
        return s

    return listen.bind(open_on)


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
