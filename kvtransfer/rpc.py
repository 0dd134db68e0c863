"""gRPC plumbing shared by the gRPC transport and the senders' control service: servers bound
to a free port, cached client channels, optional TLS."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from pdserve.kvtransfer.listen import Listen

OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for TLS: the server presents cert/key; clients trust `ca` (a self-signed cert works)."""

    cert: str
    key: str
    ca: str

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(Path(self.key).read_bytes(), Path(self.cert).read_bytes())])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca).read_bytes())


class RpcServer:
    """A started gRPC server and the thread pool its handlers run on: `stop` ends both (grpc leaves
    a pool it was given running, one idle thread per handler ever run, for every server ever made)."""

    def __init__(self, server: grpc.Server, executor: ThreadPoolExecutor) -> None:
        self.server, self._executor = server, executor

    def stop(self, grace: float | None = None) -> threading.Event:
        done = self.server.stop(grace)
        done.wait((grace or 0) + 5.0)  # every call aborted; no handler gets scheduled any more
        self._executor.shutdown(wait=False, cancel_futures=True)
        return done


def start_server(listen: Listen, tls: TLSFiles | None, register: list, max_workers: int = 16
                 ) -> tuple[RpcServer, str]:
    """A started server with the given `(add_XServicer_to_server, servicer)` pairs on a free port of
    `listen`; returns it and the address peers dial."""
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-grpc")
    # No SO_REUSEPORT (grpc's default): two servers on one port of a port range would split its calls.
    server = grpc.server(executor, options=[*OPTIONS, ("grpc.so_reuseport", 0)])
    for add, servicer in register:
        add(servicer, server)

    def open_on(port: int) -> int:
        bind = f"[{listen.bind_host}]:{port}" if ":" in listen.bind_host else f"{listen.bind_host}:{port}"
        bound = server.add_secure_port(bind, tls.server_credentials()) if tls else server.add_insecure_port(bind)
        if not bound:  # older grpc returns 0 instead of raising
            raise OSError(f"cannot bind {bind}")
        return bound

    port = listen.bind(open_on)
    server.start()
    return RpcServer(server, executor), listen.addr(port)


class Channels:
    """One client channel per peer address, created on first use; closed together."""

    def __init__(self, tls: TLSFiles | None) -> None:
        self.tls = tls
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, addr: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(addr)
            if ch is None:
                ch = (grpc.secure_channel(addr, self.tls.channel_credentials(), OPTIONS) if self.tls
                      else grpc.insecure_channel(addr, OPTIONS))
                self._channels[addr] = ch
            return ch

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.close()
