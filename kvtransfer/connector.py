"""The two ends of a KV transfer, built from config: `make_sender` (prefill) and `make_receiver` (decode).

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

from pdserve.config import KVTransferConfig
from pdserve.engine.kv_cache import BlockAllocator, KVPool
from pdserve.kvtransfer.controller import CodecController
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.protocols import Transport
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.rpc import TLSFiles
from pdserve.kvtransfer.sender import KVSender
from pdserve.kvtransfer.types import Span

__all__ = ["KVReceiver", "KVSender", "Listen", "make_receiver", "make_sender", "make_transport"]


def make_transport(name: str, listen: Listen, tls: TLSFiles | None = None, serve: bool = True,
                   pair_timeout_s: float = 300.0) -> Transport:
    """A transport by config name. `serve=False` builds a receive-only gRPC end (no server)."""
    if name == "loopback":
        from pdserve.kvtransfer.transport_loopback import LoopbackTransport

        return LoopbackTransport()
    if name == "grpc":
        from pdserve.kvtransfer.transport_grpc import GrpcTransport

        return GrpcTransport(listen, tls, serve)
    if name == "torch":
        from pdserve.kvtransfer.transport_torch import TorchTransport

        return TorchTransport(listen, pair_timeout_s)
    raise ValueError(f"kvtransfer.transport: unknown transport {name!r}")


def make_sender(cfg: KVTransferConfig, pool: KVPool, allocator: BlockAllocator, *,
                listen: Listen, transport: Transport | None = None, layers: Span | None = None,
                heads: Span | None = None, tls: TLSFiles | None = None) -> KVSender:
    """The prefill end, serving at once on `listen` (`Listen.resolve(cfg, node_ip)` in serving).
    `layers`/`heads`: this rank's global spans under TP/PP."""
    transport = transport or make_transport(cfg.transport, listen, tls, pair_timeout_s=cfg.timeout_s * 4)
    return KVSender(pool, allocator, transport, lease_s=cfg.lease_s, timeout_s=cfg.timeout_s, listen=listen,
                    layers=layers, heads=heads, tls=tls)


def make_receiver(cfg: KVTransferConfig, pool: KVPool, *, listen: Listen, transport: Transport | None = None,
                  layers: Span | None = None, heads: Span | None = None,
                  tls: TLSFiles | None = None) -> KVReceiver:
    """The decode end. It dials each sender's control and data endpoints; only the torch transport
    listens here (each pair's TCPStore and gloo socket, on `listen`)."""
    transport = transport or make_transport(cfg.transport, listen, tls, serve=False,
                                            pair_timeout_s=cfg.timeout_s * 4)
    controller = CodecController(cfg.link_gbps, fixed=None if cfg.codec == "auto" else cfg.codec)
    return KVReceiver(pool, transport, timeout_s=cfg.timeout_s, codec=cfg.codec, layers=layers, heads=heads,
                      tls=tls, controller=controller)
