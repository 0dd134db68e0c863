"""Resharding between parallel layouts, and the slot math between a pool and a token-major slab.

A decode rank owns a (layer span x kv-head span) of the model; a handle lists which prefill ranks
hold which spans. `plan_pulls` intersects them (DistServe's intersection copy), so any prefill
(TP, PP) feeds any decode (TP, PP). A head replicated on several shards (TP > kv heads) is pulled
once, from the first shard that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pdserve.engine.kv_cache import KVLayout, KVPool
from pdserve.kvtransfer.types import KVHandle, KVShard, Span


@dataclass(frozen=True)
class Piece:
    """Pull `layers` x `heads` (global indices) from `shard`."""

    shard: KVShard
    layers: Span
    heads: Span


def plan_pulls(handle: KVHandle, layers: Span, heads: Span) -> list[Piece]:
    """Pieces that cover layers x heads exactly once; ValueError if the shards leave a hole."""
    pieces: list[Piece] = []
    covered: set[tuple[int, int]] = set()
    for shard in handle.shards:
        li, hi = shard.layers.intersect(layers), shard.heads.intersect(heads)
        if li is None or hi is None:
            continue
        # keep the heads of this shard not already taken, as one contiguous run per layer span
        fresh = [h for h in range(hi.start, hi.stop) if (li.start, h) not in covered]
        if not fresh:
            continue
        run = Span(fresh[0], fresh[0] + 1)
        while run.stop in fresh:
            run = Span(run.start, run.stop + 1)
        pieces.append(Piece(shard, li, run))
        covered |= {(layer, h) for layer in range(li.start, li.stop) for h in range(run.start, run.stop)}
    missing = len(layers) * len(heads) - len(covered)
    if missing:
        raise ValueError(f"handle {handle.handle_id}: shards do not cover layers [{layers.start}, "
                         f"{layers.stop}) x heads [{heads.start}, {heads.stop}) ({missing} cells missing)")
    return pieces


def rank_spans(first_layer: int, layout: KVLayout, tp_rank: int) -> tuple[Span, Span]:
    """The global (layers, kv heads) one rank's pool holds: its stage's layers, from global layer
    `first_layer` on, and its contiguous 1/tp of the kv heads (engine/tp.py's split). `layout` is
    the rank's own pool layout (its share of layers and heads); at tp = pp = 1 the spans cover the
    whole model."""
    h = layout.num_kv_heads  # this rank's share: num_kv_heads / tp
    return Span(first_layer, first_layer + layout.num_layers), Span(tp_rank * h, (tp_rank + 1) * h)

def token_slots(block_ids: Sequence[int], block_size: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """Flat slot of each token in a pool viewed as (num_blocks * block_size, ...).

    token t lives in block block_ids[t // block_size] at offset t % block_size, so
    slot(t) = block_ids[t // block_size] * block_size + t % block_size, for t in [0, num_tokens).
    """
    assert len(block_ids) * block_size >= num_tokens, \
        f"{len(block_ids)} blocks of {block_size} cannot hold {num_tokens} tokens"
    t = torch.arange(num_tokens, device=device)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.long, device=device)
    return blocks[t // block_size] * block_size + t % block_size


def gather_slab(pool: KVPool, layer: int, slots: torch.Tensor, heads: slice) -> torch.Tensor:
    """Local `layer`'s KV at `slots`, heads `heads`: (2, num_tokens, num_heads, head_dim)."""
    kv = pool.kv[layer].flatten(1, 2)  # (2, num_blocks * block_size, H, D)
    return kv.index_select(1, slots)[:, :, heads]


def scatter_slab(pool: KVPool, layer: int, slots: torch.Tensor, heads: slice, slab: torch.Tensor) -> None:
    """Inverse of gather_slab: write slab (2, num_tokens, num_heads, head_dim) into the pool."""
    kv = pool.kv[layer].flatten(1, 2)  # (2, num_blocks * block_size, H, D), a view of the pool
    kv[:, slots, heads] = slab.to(device=kv.device, dtype=kv.dtype)
