"""Options of the two ends of a transfer, as frozen dataclasses: what `KVSender`/`KVReceiver` are
built from besides their pool and transport. `from_config` maps the serving config's `kvtransfer`
section (plus what only the caller knows: where to listen, this rank's spans) onto them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.config import KVTransferConfig
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.rpc import TLSFiles
from pdserve.kvtransfer.types import Span


def tls_files(cfg: KVTransferConfig) -> TLSFiles | None:
    """The config's `tls` section as the PEM paths the gRPC plumbing reads; None when TLS is off."""
    return None if cfg.tls is None else TLSFiles(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)


@dataclass(frozen=True, kw_only=True)
class SenderOptions:
    """`listen`: where the control service (and a serving transport) binds. `lease_s`: an export nobody
    pulled is freed after this many seconds. `timeout_s`: bound on one send and on waiting for a
    layer. `layers`/`heads`: the global spans this rank's pool holds (None: the whole pool);
    `model_layers`/`model_heads`: the whole model's, when this rank holds a shard (None: the spans' ends)."""

    listen: Listen
    lease_s: float = 60.0
    timeout_s: float = 30.0
    layers: Span | None = None
    heads: Span | None = None
    model_layers: int | None = None
    model_heads: int | None = None
    tls: TLSFiles | None = None

    @classmethod
    def from_config(cls, cfg: KVTransferConfig, listen: Listen, layers: Span | None = None,
                    heads: Span | None = None) -> SenderOptions:
        return cls(listen=listen, lease_s=cfg.lease_s, timeout_s=cfg.timeout_s, layers=layers, heads=heads,
                   tls=tls_files(cfg))


@dataclass(frozen=True, kw_only=True)
class ReceiverOptions:
    """`timeout_s`: bound on one pull, control RPCs included. `codec`: a codec name, or "auto" (chosen
    per pull by the receiver's CodecController). `layers`/`heads`: this rank's global spans (None:
    the whole pool). `tls`: PEM files for the control channel (None: plaintext)."""

    timeout_s: float = 30.0
    codec: str = "raw"
    layers: Span | None = None
    heads: Span | None = None
    tls: TLSFiles | None = None

    @classmethod
    def from_config(cls, cfg: KVTransferConfig, layers: Span | None = None,
                    heads: Span | None = None) -> ReceiverOptions:
        return cls(timeout_s=cfg.timeout_s, codec=cfg.codec, layers=layers, heads=heads, tls=tls_files(cfg))
