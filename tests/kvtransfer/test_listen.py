"""Where KV endpoints bind and what they advertise; the launch-time reachability check."""

from __future__ import annotations

import re
import socket

import pytest

from pdserve.config import ConfigError, KVTransferConfig, ServingConfig
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.reach import Endpoint, endpoints, probe_socket, unreachable
from pdserve.kvtransfer.rpc import start_server
from pdserve.kvtransfer.types import PeerAddr


def test_defaults_bind_and_advertise_the_node_ip() -> None:
    assert Listen.resolve(KVTransferConfig(), "10.1.2.3") == Listen("10.1.2.3", "10.1.2.3", None)


def test_a_wildcard_bind_advertises_the_node_ip_and_overrides_win() -> None:
    wild = Listen.resolve(KVTransferConfig(bind_host="0.0.0.0"), "10.1.2.3")
    assert (wild.bind_host, wild.advertise_host, wild.local_host) == ("0.0.0.0", "10.1.2.3", "10.1.2.3")
    nat = Listen.resolve(KVTransferConfig(advertise_host="203.0.113.7", port_range="4000-4010"), "10.1.2.3")
    assert nat == Listen("10.1.2.3", "203.0.113.7", (4000, 4010))


@pytest.mark.parametrize("field,value,message", [
    ("port_range", "4000", "port_range: expected 'LOW-HIGH'"),
    ("port_range", "5000-4000", "port_range: expected 'LOW-HIGH'"),
    ("port_range", "1-70000", "port_range: expected 'LOW-HIGH'"),
    ("advertise_host", "0.0.0.0", "advertise_host: peers cannot dial"),
    ("bind_host", "a b", "bind_host: must be a host name"),
    ("on_failure", "retry", "on_failure: must be one of ['recompute', 'fail']"),
])
def test_bad_address_settings_name_the_field(field: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(f"kvtransfer.{message}")):
        ServingConfig.from_dict({"kvtransfer": {field: value}})


def _free_port_range(n: int) -> tuple[int, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        lo = s.getsockname()[1]
    return lo, lo + n - 1


def test_servers_bind_inside_the_port_range_and_say_so_when_it_is_full() -> None:
    lo, hi = _free_port_range(1)
    listen = Listen("127.0.0.1", "127.0.0.1", (lo, hi))
    server, addr = start_server(listen, None, [])
    try:
        assert addr == f"127.0.0.1:{lo}"
        with pytest.raises(OSError, match=f"kvtransfer.port_range: no free port in {lo}-{hi} on 127.0.0.1"):
            start_server(listen, None, [])
    finally:
        server.stop(None)


def test_reachability_names_the_endpoint_that_does_not_answer() -> None:
    server, addr = start_server(Listen.on("127.0.0.1"), None, [])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    try:
        targets = endpoints("prefill-0", "10.0.0.1", [PeerAddr(addr, "torch:abc"),
                                                      PeerAddr(f"127.0.0.1:{dead_port}", addr)])
        assert [(e.kind, e.addr) for e in targets] == [("control", addr), ("control", f"127.0.0.1:{dead_port}"),
                                                       ("data", addr)]  # a torch endpoint is a name
        (error,) = unreachable(targets, timeout_s=2)
        assert error.startswith(f"prefill-0's KV control endpoint 127.0.0.1 port {dead_port} (on node 10.0.0.1) "
                                "is unreachable: ")
        assert unreachable([Endpoint("p", "n", "control", addr)], 2) == []
    finally:
        server.stop(None)


def test_a_probe_listens_inside_the_port_range_and_answers() -> None:
    lo, hi = _free_port_range(1)
    listen = Listen("127.0.0.1", "127.0.0.1", (lo, hi))
    probe = probe_socket(listen)
    try:
        assert probe.getsockname() == ("127.0.0.1", lo)
        assert unreachable([Endpoint("decode-0", "n", "rendezvous", listen.addr(lo))], 2) == []
    finally:
        probe.close()
