"""Torch-free transfer types: what the router passes around (`KVHandle`) and what `poll()` returns.

A `KVHandle` names KV blocks pinned on the prefill side: one `KVShard` per prefill rank, each with
the global (layer range x kv-head range) that rank holds and where to reach its `KVSender`. The
router treats it as opaque; it pickles through Ray and holds only ints and strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

TransferId = NewType("TransferId", str)
HandleId = NewType("HandleId", str)


class TransferStatus(enum.Enum):
    PENDING = "pending"  # accepted, nothing moved yet
    IN_FLIGHT = "in_flight"  # bytes are moving
    DONE = "done"  # every byte arrived, was verified and is in place
    FAILED = "failed"  # terminal; the transfer carries an error string

    @property
    def terminal(self) -> bool:
        return self in (TransferStatus.DONE, TransferStatus.FAILED)


@dataclass(frozen=True)
class PeerAddr:
    """Where a prefill rank's `KVSender` listens: its control RPC and its data endpoint."""

    control: str  # "host:port" of the KVControl gRPC service
    data: str = ""  # the transport's own endpoint ("" when the transport needs none)


@dataclass(frozen=True)
class Span:
    """Half-open interval [start, stop) of global indices (layers or kv heads)."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        assert 0 <= self.start <= self.stop, f"bad span [{self.start}, {self.stop})"

    def __len__(self) -> int:
        return self.stop - self.start

    def intersect(self, other: Span) -> Span | None:
        lo, hi = max(self.start, other.start), min(self.stop, other.stop)
        return Span(lo, hi) if lo < hi else None


@dataclass(frozen=True)
class KVShard:
    """The part of a request's KV that one prefill rank holds, in that rank's own blocks."""

    peer: PeerAddr
    layers: Span  # global layer indices this rank holds
    heads: Span  # global kv-head indices this rank holds
    block_ids: tuple[int, ...]  # in the rank's pool, token order; len = ceil(num_tokens / block_size)


@dataclass(frozen=True)
class KVHandle:
    """Reference to one request's KV living on prefill workers; the only transfer type the router sees.

    The layout fields describe the whole model (not one rank): every shard's spans lie inside
    [0, num_layers) x [0, num_kv_heads), and together the shards cover it.
    """

    handle_id: HandleId
    request_id: str
    num_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # the source cache's block size (the destination may use another)
    dtype: str
    shards: tuple[KVShard, ...]
    prefill_s: float | None = None  # how long producing this KV took (input of codec=auto)


def merge_handles(handles: list[KVHandle]) -> KVHandle:
    """One handle from the per-rank handles of a TP/PP prefill instance (they share handle_id)."""
    first = handles[0]
    assert all(h.handle_id == first.handle_id and h.num_tokens == first.num_tokens for h in handles), \
        "merging handles of different exports"
    shards = tuple(s for h in handles for s in h.shards)
    return KVHandle(first.handle_id, first.request_id, first.num_tokens, first.num_layers,
                    first.num_kv_heads, first.head_dim, first.block_size, first.dtype, shards,
                    max((h.prefill_s for h in handles if h.prefill_s is not None), default=None))
