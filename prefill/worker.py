"""PrefillWorker: engine + PrefillScheduler + KV sender. Plain class; prefill/actor.py is its Ray shell.

Block ownership: while queued and computing, the request owns its blocks. After the first token
is sampled, `sender.export` adds the sender's reference (pinning the blocks for decode to pull)
and the engine drops the request's own; the sender frees them on release or lease expiry.
A request that finishes at its first token exports nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

from pdserve import faultpoints
from pdserve.engine.engine import Engine, failed_step_outputs
from pdserve.engine.request import Request
from pdserve.prefill.scheduler import PrefillScheduler
from pdserve.types import GenerateRequest, PrefillResult, RequestId, StepOutput, StepRecord, WorkerStats

log = logging.getLogger(__name__)


class PrefillWorker:
    def __init__(self, engine: Engine, max_num_seqs: int, max_num_batched_tokens: int, sender: Any,
                 worker_id: str = "prefill-0", clock: Callable[[], float] = time.monotonic) -> None:
        self.engine, self.sender, self.worker_id, self.clock = engine, sender, worker_id, clock
        self.scheduler = PrefillScheduler(engine, max_num_seqs, max_num_batched_tokens)
        self._requests: dict[RequestId, Request] = {}
        self._submitted_s: dict[RequestId, float] = {}
        self._started_s: dict[RequestId, float] = {}
        self._exports: dict[RequestId, str] = {}  # request → handle id while the sender pins its KV
        self.idle = False  # the last step ran no batch: the step thread may sleep until new input
        self.num_failed_steps = 0

    def submit(self, req: GenerateRequest, received_s: float | None = None) -> None:
        """Queue a request; raises ValueError (naming the field) if it can never run here.
        `received_s` (this worker's clock): when the instance got it, if earlier than now — a
        request that waited for the step thread to finish a step has been queued since then."""
        if req.request_id in self._requests:
            raise ValueError(f"request_id: {req.request_id!r} is already queued on {self.worker_id}")
        r = self.engine.add_request(req)
        if self.engine.layout.num_blocks_for(r.num_tokens) > self.engine.allocator.num_blocks:
            raise ValueError(f"prompt: {r.num_tokens} tokens do not fit this instance's KV cache")
        self._requests[r.request_id] = r
        self._submitted_s[r.request_id] = self.clock() if received_s is None else received_s
        self.scheduler.add(r)
        self.idle = False
        faultpoints.reached("prefill.waiting", (r,))  # chaos (pdserve/faultpoints.py): a no-op unless armed

    def abort(self, request_id: RequestId) -> bool:
        """Drop a queued request, or release the KV of one already exported (nobody will pull it)."""
        r = self._requests.pop(request_id, None)
        if r is None:
            handle_id = self._exports.pop(request_id, None)
            if handle_id is not None:
                self.sender.release(handle_id)  # the blocks free at the next sender.poll()
            return handle_id is not None
        self.scheduler.remove(r)
        self.engine.finish(r, "abort")
        self._submitted_s.pop(request_id, None)
        self._started_s.pop(request_id, None)
        return True

    def step(self) -> list[PrefillResult]:
        """Run one prefill batch; return a result for each request that sampled its first token."""
        freed = set(self.sender.poll())  # serve releases and expire leases before deciding what fits
        if freed:
            self._exports = {rid: h for rid, h in self._exports.items() if h not in freed}
        batch = self.scheduler.schedule()
        self.idle = not batch.chunks
        if self.idle:
            return []
        now = self.clock()
        for c in batch.chunks:
            self._started_s.setdefault(c.request.request_id, now)
        faultpoints.reached("prefill.forward", batch.chunks)
        try:
            outputs = self.engine.step(batch)
        except Exception as e:  # noqa: BLE001 - contained: the batch's requests fail, the worker lives on
            return self._fail_batch([c.request.request_id for c in batch.chunks], e)
        return [self._result(o) for o in outputs]

    def _fail_batch(self, request_ids: list[RequestId], e: Exception) -> list[PrefillResult]:
        """As DecodeWorker._fail_batch: error outputs for the batch's requests, blocks freed, counted."""
        log.exception("step failed on %s; failing its %d requests", self.worker_id, len(request_ids))
        self.num_failed_steps += 1
        outs = failed_step_outputs(self.worker_id, request_ids, e)
        for o in outs:
            self.abort(o.request_id)
        return [PrefillResult(o, None) for o in outs]

    def _result(self, out: StepOutput) -> PrefillResult:
        rid = out.request_id
        r = self._requests.pop(rid)
        submitted, started = self._submitted_s.pop(rid), self._started_s.pop(rid)
        out = dataclasses.replace(out, timings={"queue_s": started - submitted, "prefill_s": self.clock() - started})
        self.scheduler.done(r)
        if r.finished:  # stopped at its first token: the engine already freed the blocks
            return PrefillResult(out, None)
        handle = self.sender.export(rid, list(r.block_table), r.num_computed_tokens,
                                    prefill_s=out.timings["prefill_s"])
        self._exports[rid] = handle.handle_id
        self.engine.finish(r, "stop")  # drops the request's reference; the export keeps the blocks pinned
        return PrefillResult(out, handle)

    def has_work(self) -> bool:
        return bool(self._requests)

    def step_log(self, since: int = 0) -> tuple[int, list[StepRecord]]:
        """The engine's steps numbered `since` onwards (engine/step_log.py)."""
        return self.engine.step_log.since(since)

    def stats(self) -> WorkerStats:
        a = self.engine.allocator
        return WorkerStats(
            worker_id=self.worker_id, num_running=0, num_waiting=len(self.scheduler.waiting),
            num_free_blocks=a.num_free, num_total_blocks=a.num_blocks,
            busy_s=self.engine.busy_s, num_steps=self.engine.num_steps, num_step_tokens=self.engine.num_step_tokens,
            outstanding_tokens=self.scheduler.outstanding_tokens, num_failed_steps=self.num_failed_steps,
        )
