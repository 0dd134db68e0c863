"""Factories of the transfer's two ends from config: `make_sender` (prefill), `make_receiver` (decode),
and `make_transport`, by name from a registry like the codecs' (`register_transport` adds one).

KVSender/KVReceiver are the only composites of codec + transport + control (sender.py, receiver.py).
Pull model, as DistServe's `_migrate_blocks`: decode allocates, pulls, then prefill frees.

Block ownership, per state of one request's KV:

    prefill  exported (export)        engine ref + export ref (allocator.fork); engine may drop its own
             being pulled              export ref; lease paused while any send reads the blocks
             released / lease expired  export ref dropped by sender.poll() on the step-loop thread
    decode   pull() .. PENDING         caller allocated dst blocks and owns them; receiver only writes
             IN_FLIGHT                 same; layers land as frames arrive (contents partial)
             DONE                      caller's blocks hold the KV; prefill was told to release
             FAILED / abort()          caller frees or reuses dst (nothing writes after abort() returns);
                                       prefill was told to stop sending and to release

Control (StartPull / Release / Abort) is a small gRPC service on every sender; data goes over the
configured transport (loopback | grpc | torch). Codec `auto` is resolved per pull by CodecController.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pdserve.config import KVTransferConfig, TensorLane
from pdserve.engine.kv_cache import KVPool
from pdserve.kvtransfer.controller import CodecController
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.options import ReceiverOptions, SenderOptions, tls_files
from pdserve.kvtransfer.protocols import BlockRefs, Transport
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.rpc import TLSFiles
from pdserve.kvtransfer.sender import KVSender
from pdserve.kvtransfer.types import Span

__all__ = ["KVReceiver", "KVSender", "Listen", "TransportOptions", "make_receiver", "make_sender",
           "make_transport", "register_transport", "TRANSPORT_NAMES"]


@dataclass(frozen=True, kw_only=True)
class TransportOptions:
    """What a transport factory may use. `serve=False`: a receive-only end (gRPC: no server).
    `pair_timeout_s`: bound on one gloo operation of the torch transport (above every transfer's
    timeout). `device`/`tensor_lane`: the pool's device and how the torch transport moves tensors."""

    listen: Listen
    tls: TLSFiles | None = None
    serve: bool = True
    pair_timeout_s: float = 300.0
    device: torch.device = torch.device("cpu")
    tensor_lane: TensorLane = "auto"


def _loopback(o: TransportOptions) -> Transport:
    from pdserve.kvtransfer.transport_loopback import LoopbackTransport

    return LoopbackTransport()


def _grpc(o: TransportOptions) -> Transport:
    from pdserve.kvtransfer.transport_grpc import GrpcTransport

    return GrpcTransport(o.listen, o.tls, o.serve)


def _torch(o: TransportOptions) -> Transport:
    from pdserve.kvtransfer.transport_torch import TorchTransport

    return TorchTransport(o.listen, o.pair_timeout_s, o.device, o.tensor_lane)


_TRANSPORTS: dict[str, Callable[[TransportOptions], Transport]] = {
    "loopback": _loopback, "grpc": _grpc, "torch": _torch}
TRANSPORT_NAMES: tuple[str, ...] = tuple(_TRANSPORTS)  # imports stay lazy: grpc and gloo load on use


def register_transport(name: str, factory: Callable[[TransportOptions], Transport]) -> None:
    """Make `factory` buildable as `make_transport(name, ...)` (a name already taken raises ValueError)."""
    if name in _TRANSPORTS:
        raise ValueError(f"transport {name!r} is already registered")
    _TRANSPORTS[name] = factory


def make_transport(name: str, listen: Listen, **options: object) -> Transport:
    """A transport by config name, not started (call `.start()`, or hand it to a sender/receiver,
    which starts it). `options`: the other fields of `TransportOptions`."""
    if name not in _TRANSPORTS:
        raise ValueError(f"kvtransfer.transport: unknown transport {name!r} (known: {', '.join(_TRANSPORTS)})")
    return _TRANSPORTS[name](TransportOptions(listen=listen, **options))  # type: ignore[arg-type]


def _transport(cfg: KVTransferConfig, listen: Listen, pool: KVPool, serve: bool) -> Transport:
    return make_transport(cfg.transport, listen, tls=tls_files(cfg), serve=serve, pair_timeout_s=cfg.timeout_s * 4,
                          device=pool.device, tensor_lane=cfg.tensor_lane)


def make_sender(cfg: KVTransferConfig, pool: KVPool, allocator: BlockRefs, *, listen: Listen,
                transport: Transport | None = None, layers: Span | None = None,
                heads: Span | None = None) -> KVSender:
    """The prefill end, started: serving on `listen` (`Listen.resolve(cfg, node_ip)` in serving).
    `layers`/`heads`: this rank's global spans under TP/PP. `transport`: one to own instead of the
    config's (e.g. a FaultyTransport)."""
    transport = transport or _transport(cfg, listen, pool, serve=True)
    return KVSender(pool, allocator, transport, SenderOptions.from_config(cfg, listen, layers, heads)).start()


def make_receiver(cfg: KVTransferConfig, pool: KVPool, *, listen: Listen, transport: Transport | None = None,
                  layers: Span | None = None, heads: Span | None = None) -> KVReceiver:
    """The decode end, started. It dials each sender's control and data endpoints; only the torch
    transport listens here (each pair's TCPStore and gloo socket, on `listen`)."""
    transport = transport or _transport(cfg, listen, pool, serve=False)
    controller = CodecController(cfg.link_gbps, fixed=None if cfg.codec == "auto" else cfg.codec)
    return KVReceiver(pool, transport, ReceiverOptions.from_config(cfg, layers, heads), controller).start()
