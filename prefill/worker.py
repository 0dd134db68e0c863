"""PrefillWorker: engine + PrefillScheduler + KV sender, wired. Plain class; prefill/actor.py is its Ray shell.

Block ownership: while queued and computing, the request owns its blocks. After the first token
is sampled, `sender.export` adds the sender's reference (pinning the blocks for decode to pull)
and the request, HANDED_OFF, drops its own; the sender frees them on release or lease expiry.
A request that finishes at its first token exports nothing.

Layer-wise streaming (`stream_exports`): a chunk that completes its prompt is exported *before* the
forward that writes it (`streaming=True`), the handle goes to `on_export` at once (the actor hands
it to the router, which dispatches decode, which starts pulling), the forward's per-layer hook makes
each layer pullable as it is written, and `mark_ready` covers engines that do not call the hook. A
step that raises, or a request that ends at its first token, releases the export.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from pdserve import faultpoints
from pdserve.engine.batch import Batch
from pdserve.engine.engine import Engine, failed_step_outputs
from pdserve.engine.request import RequestStatus
from pdserve.prefill.scheduler import PrefillScheduler
from pdserve.types import GenerateRequest, PrefillResult, RequestId, StepRecord, WorkerStats

if TYPE_CHECKING:
    from pdserve.kvtransfer.protocols import KVSource
    from pdserve.kvtransfer.types import KVHandle

log = logging.getLogger(__name__)


class PrefillWorker:
    def __init__(self, engine: Engine, max_num_seqs: int, max_num_batched_tokens: int, sender: KVSource,
                 worker_id: str = "prefill-0", clock: Callable[[], float] = time.monotonic) -> None:
        self.engine, self.sender, self.worker_id, self.clock = engine, sender, worker_id, clock
        self.scheduler = PrefillScheduler(engine, max_num_seqs, max_num_batched_tokens)
        self.idle = False  # the last step ran no batch: the step thread may sleep until new input
        self.num_failed_steps = 0
        self.on_export: Callable[[list[KVHandle]], None] | None = None  # set by stream_exports

    def stream_exports(self, on_export: Callable[[list[KVHandle]], None]) -> None:
        """Stream KV layer by layer: from now on, export each prompt before the forward that completes
        it and pass the handles to `on_export` (on the step thread, before that forward runs)."""
        self.on_export = on_export

    def submit(self, req: GenerateRequest, received_s: float | None = None) -> None:
        """Queue a request; raises ValueError (naming the field) if it can never run here.
        `received_s` (this worker's clock): when the instance got it, if earlier than now — a
        request that waited for the step thread to finish a step has been queued since then."""
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"request_id: {req.request_id!r} is already queued on {self.worker_id}")
        r = self.engine.add_request(req)
        if self.engine.layout.num_blocks_for(r.num_tokens) > self.engine.allocator.num_blocks:
            raise ValueError(f"prompt: {r.num_tokens} tokens do not fit this instance's KV cache")
        self.scheduler.add(r, self.clock() if received_s is None else received_s)
        self.idle = False
        faultpoints.reached("prefill.waiting", (r,))  # chaos (pdserve/faultpoints.py): a no-op unless armed

    def abort(self, request_id: RequestId) -> bool:
        """Drop a queued request, or release the KV of one already exported (nobody will pull it)."""
        r = self.scheduler.requests.get(request_id)
        if r is not None:
            self.scheduler.finish(r, "abort")
            return True
        exports = self.scheduler.exports_of(request_id)
        for handle_id in exports:
            self.sender.release(handle_id)  # the blocks free at the next sender.poll()
        self.scheduler.released(exports)  # nobody will pull it: forget it now
        return bool(exports)

    def step(self) -> list[PrefillResult]:
        """Run one prefill batch; return a result for each request that sampled its first token."""
        self.scheduler.released(self.sender.poll())  # serve releases and expire leases before deciding what fits
        batch = self.scheduler.schedule(self.clock())
        self.idle = not batch.chunks
        if self.idle:
            return []
        streams = self._export_early(batch)
        faultpoints.reached("prefill.forward", batch.chunks)
        try:
            sampled = self.engine.step(batch, layer_hook=self.sender.layer_hook if streams else None)
        except Exception as e:  # noqa: BLE001 - contained: the batch's requests fail, the worker lives on
            for h in streams.values():
                self.sender.release(h.handle_id)  # nobody may pull a KV that was never written
            return self._fail_batch([c.request.request_id for c in batch.chunks], e)
        for h in streams.values():
            self.sender.mark_ready(h.handle_id)  # every layer is written (rank engines may not call the hook)
        results = []
        for r, out in self.scheduler.update(sampled, self.clock()):
            handle = streams.get(r.request_id)
            if r.status is not RequestStatus.HANDED_OFF:  # ended at its first token: nothing to pull
                if handle is not None:
                    self.sender.release(handle.handle_id)  # decode aborts its pull; the blocks free at poll
                results.append(PrefillResult(out, None))
                continue
            if handle is None:
                prefill_s = out.latency.prefill_s if out.latency is not None else 0.0
                handle = self.sender.export(r.request_id, list(r.block_table), r.num_computed_tokens,
                                            prefill_s=prefill_s)
            self.scheduler.exported(r, handle)
            results.append(PrefillResult(out, handle))
        return results

    def _export_early(self, batch: Batch) -> dict[RequestId, KVHandle]:
        """With streaming on: export each chunk that completes its prompt in this step (earlier chunks
        of a chunked prompt do not stream) and hand the handles to `on_export`, before the forward."""
        if self.on_export is None:
            return {}
        streams = {}
        for c in batch.chunks:
            r = c.request
            if r.num_computed_tokens + c.num_tokens == r.num_tokens:
                streams[r.request_id] = self.sender.export(r.request_id, list(r.block_table), r.num_tokens,
                                                           streaming=True)
        if streams:
            self.on_export(list(streams.values()))
        return streams

    def _fail_batch(self, request_ids: list[RequestId], e: Exception) -> list[PrefillResult]:
        """As DecodeWorker._fail_batch: error outputs for the batch's requests, blocks freed, counted."""
        log.exception("step failed on %s; failing its %d requests", self.worker_id, len(request_ids))
        self.num_failed_steps += 1
        outs = failed_step_outputs(self.worker_id, request_ids, e)
        for o in outs:
            self.abort(o.request_id)
        return [PrefillResult(o, None) for o in outs]

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting)

    def step_log(self, since: int = 0) -> tuple[int, list[StepRecord]]:
        """The engine's steps numbered `since` onwards (engine/step_log.py)."""
        return self.engine.step_log.since(since)

    def stats(self) -> WorkerStats:
        a = self.engine.allocator
        return WorkerStats(
            worker_id=self.worker_id, num_running=0, num_waiting=len(self.scheduler.waiting),
            num_free_blocks=a.num_free, num_total_blocks=a.num_blocks,
            outstanding_tokens=self.scheduler.outstanding_tokens, num_failed_steps=self.num_failed_steps,
            **self.engine.counters(),
        )
