"""A prefill rank of a tp × pp instance: agreed block frees and the instance's merged KVHandle.

Every rank's KVSender exports its own shard (its layers × kv heads) under one handle id per
export, shared by the instance. A sender frees blocks when receivers released them or its lease
expired: events that reach ranks at different times. So the allocator a sender sees here only
records its frees; `AgreedSender` returns the blocks to the pool once every rank has freed that
handle, in handle-id order, so free-block counts (and scheduling) stay identical across ranks.
Rank 0 answers with one KVHandle naming every rank's shard; block ids are the same on all ranks
(SPMD allocation), which `agree` checks every step.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch.distributed as dist

from pdserve.config import ServingConfig
from pdserve.engine.kv_cache import BlockAllocator
from pdserve.engine.pipeline import RankLayout
from pdserve.kvtransfer.factories import KVSender, Listen, make_sender
from pdserve.kvtransfer.types import HandleId, KVHandle, KVShard, PeerAddr, Span
from pdserve.lockstep import LockStep, load_rank_engine, rank_spans
from pdserve.prefill.worker import PrefillWorker


class _RecordingAllocator:
    """The sender's view of the allocator: pins at once, records frees for AgreedSender."""

    def __init__(self, inner: BlockAllocator) -> None:
        self.inner, self.freed = inner, []  # freed: block-id lists, in the sender's free order

    def fork(self, block_ids: list[int]) -> None:
        self.inner.fork(block_ids)

    def free(self, block_ids: tuple[int, ...] | list[int]) -> None:
        self.freed.append(list(block_ids))


class AgreedSender:
    """What PrefillWorker uses as its sender on a rank; also the rank's `Agreement` on frees."""

    def __init__(self, sender: KVSender, recorder: _RecordingAllocator,
                 peers: list[tuple[PeerAddr, Span, Span]], ranks: RankLayout) -> None:
        self.sender, self._recorder, self.peers, self.ranks = sender, recorder, peers, ranks
        self._pending: dict[HandleId, list[int]] = {}  # freed by this rank's sender, not yet by all
        self._freed_by = Counter[HandleId]()  # how many ranks freed each pending handle
        self._exported: list[tuple[str, tuple[int, ...]]] = []  # since the last report
        self._seq = 0

    def export(self, request_id: str, block_ids: list[int], num_tokens: int, **kw: Any) -> KVHandle:
        self._seq += 1  # same on every rank; unique even if a request id comes back
        h = self.sender.export(request_id, block_ids, num_tokens, handle_id=f"{request_id}#{self._seq}", **kw)
        self._exported.append((h.handle_id, tuple(block_ids)))
        if self.ranks.rank != 0:
            return h
        shards = tuple(KVShard(peer, layers, heads, tuple(block_ids)) for peer, layers, heads in self.peers)
        return dataclasses.replace(h, shards=shards)

    @property
    def addresses(self) -> list[PeerAddr]:
        """Every rank's endpoints (the instance's whole KV), as rank 0 gathered them."""
        return [peer for peer, _, _ in self.peers]

    def poll(self) -> list[HandleId]:
        return []  # frees happen in agree(), at the same point of the step on every rank

    def close(self) -> None:
        self.sender.close()

    def local_report(self) -> tuple[list[HandleId], list[tuple[str, tuple[int, ...]]]]:
        hids = self.sender.poll()
        self._pending.update(zip(hids, self._recorder.freed))
        self._recorder.freed = []
        exported, self._exported = self._exported, []
        return hids, exported

    def agree(self, reports: list[tuple[list[HandleId], list[tuple[str, tuple[int, ...]]]]]) -> None:
        assert all(r[1] == reports[0][1] for r in reports), "ranks exported different blocks"
        for hids, _ in reports:
            self._freed_by.update(hids)
        for hid in sorted(h for h, n in self._freed_by.items() if n == self.ranks.world_size):
            del self._freed_by[hid]
            self._recorder.inner.free(self._pending.pop(hid))


def build_prefill_rank(cfg: ServingConfig, worker_id: str, ranks: RankLayout, init_method: str,
                       listen: Listen) -> LockStep:
    """Join the instance, load this rank's shard and start its sender. Collective: every rank calls it."""
    engine = load_rank_engine(cfg.model, cfg.engine, ranks, init_method)
    layers, heads = rank_spans(engine, ranks)
    recorder = _RecordingAllocator(engine.allocator)
    mcfg = engine.model_config
    sender = make_sender(cfg.kvtransfer, engine.pool, recorder, listen=listen, layers=layers,  # type: ignore[arg-type]
                         heads=heads).with_model_shape(mcfg.num_layers, mcfg.num_kv_heads)
    peers: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(peers, (sender.address, layers, heads))
    agreed = AgreedSender(sender, recorder, peers, ranks)
    worker = PrefillWorker(engine, cfg.prefill.max_num_seqs, cfg.prefill.max_num_batched_tokens, agreed,
                           worker_id=worker_id)
    return LockStep(worker, [agreed], ranks)
