"""AgreedSender: a prefill rank's KV sender whose block frees all ranks of the instance agree on.

Every rank's KVSender exports its own shard (its layers × kv heads) under one handle id per
export, shared by the instance. A sender frees blocks when receivers released them or its lease
expired: events that reach ranks at different times. So the allocator a sender sees here only
records its frees (`RecordingAllocator`); `AgreedSender` returns the blocks to the pool once every
rank has freed that handle, in handle-id order, so free-block counts (and scheduling) stay
identical across ranks. Rank 0 answers with one KVHandle naming every rank's shard; block ids are
the same on all ranks (SPMD allocation), which `agree` checks every step. With one rank the
agreement is that rank's own report: frees happen at the same point of the step as a bare
sender's.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pdserve.engine.kv_cache import BlockAllocator
from pdserve.engine.pipeline import RankLayout
from pdserve.kvtransfer.sender import KVSender
from pdserve.kvtransfer.types import HandleId, KVHandle, KVShard, PeerAddr, Span

Report = tuple[list[HandleId], list[tuple[str, tuple[int, ...]]]]  # (handles freed, exports) since the last step


class RecordingAllocator:
    """The sender's view of the allocator (a kvtransfer BlockRefs): pins at once, records frees."""

    def __init__(self, inner: BlockAllocator) -> None:
        self.inner = inner
        self.freed: list[list[int]] = []  # block-id lists, in the sender's free order

    def fork(self, block_ids: Sequence[int]) -> None:
        self.inner.fork(block_ids)

    def free(self, block_ids: Sequence[int]) -> None:
        self.freed.append(list(block_ids))


class AgreedSender:
    """What PrefillWorker uses as its sender on a rank; also the rank's `Agreement` on frees."""

    def __init__(self, sender: KVSender, recorder: RecordingAllocator,
                 peers: list[tuple[PeerAddr, Span, Span]], ranks: RankLayout) -> None:
        self.sender, self._recorder, self.peers, self.ranks = sender, recorder, peers, ranks
        self._pending: dict[HandleId, list[int]] = {}  # freed by this rank's sender, not yet by all
        self._freed_by = Counter[HandleId]()  # how many ranks freed each pending handle
        self._exported: list[tuple[str, tuple[int, ...]]] = []  # since the last report
        self._agreed_free: list[HandleId] = []  # blocks returned to the pool, not yet polled
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

    def release(self, handle_id: str) -> None:
        """Drop an export on this rank (every rank replays the abort that calls it); agreed at a step."""
        self.sender.release(handle_id)

    def layer_hook(self, layer: int) -> None:
        self.sender.layer_hook(layer)  # this rank's own layers: rank-local, like the forward that writes them

    def mark_ready(self, handle_id: str) -> None:
        self.sender.mark_ready(handle_id)

    def poll(self) -> list[HandleId]:
        """The handles whose blocks returned to the pool at this step's agreement (identical on all ranks)."""
        freed, self._agreed_free = self._agreed_free, []
        return freed

    def close(self) -> None:
        self.sender.close()

    def local_report(self) -> Report:
        hids = self.sender.poll()
        self._pending.update(zip(hids, self._recorder.freed))
        self._recorder.freed = []
        exported, self._exported = self._exported, []
        return hids, exported

    def agree(self, reports: list[Report]) -> None:
        assert all(r[1] == reports[0][1] for r in reports), "ranks exported different blocks"
        for hids, _ in reports:
            self._freed_by.update(hids)
        for hid in sorted(h for h, n in self._freed_by.items() if n == self.ranks.world_size):
            del self._freed_by[hid]
            self._recorder.inner.free(self._pending.pop(hid))
            self._agreed_free.append(hid)
