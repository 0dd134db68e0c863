"""DecodeWorker: engine + DecodeScheduler + KV receiver. Plain class; decode/actor.py is its Ray shell.

A request arrives with a KVHandle (disaggregated) or without one (colocated, or a re-dispatched
request to recompute). Block ownership through a pulled request's life:

  pending     no blocks here; KV is pinned on prefill until we pull (back-pressure under bursts)
  pulling     blocks allocated here and owned by the request; the receiver writes into them
  running     owned by the request; freed by the engine when it finishes
  failed pull on_failure=recompute: blocks kept, num_computed_tokens reset, recomputed here
              (counted, and flagged `kv_recomputed` in the request's timings); on_failure=fail:
              freed here, the request ends with an error output
  aborted     freed here; the receiver tells prefill to release the source blocks
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Callable

from pdserve.decode.scheduler import DecodeScheduler, Policy
from pdserve import faultpoints
from pdserve.engine.engine import Engine, failed_step_outputs
from pdserve.engine.request import Request, RequestStatus
from pdserve.types import GenerateRequest, RequestId, StepOutput, StepRecord, WorkerStats

if TYPE_CHECKING:
    from pdserve.kvtransfer.types import KVHandle

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pull:
    request: Request
    handle: KVHandle
    submitted_s: float
    transfer: Any = None  # the receiver's transfer id once started
    started_s: float = 0.0


class DecodeWorker:
    def __init__(self, engine: Engine, policy: Policy, max_num_seqs: int, max_num_batched_tokens: int,
                 receiver: Any = None, worker_id: str = "decode-0",
                 clock: Callable[[], float] = time.monotonic, on_failure: str = "recompute") -> None:
        self.engine, self.receiver, self.worker_id, self.clock = engine, receiver, worker_id, clock
        self.on_failure = on_failure  # kvtransfer.on_failure: "recompute" | "fail"
        self.kv_pulls: Counter[str] = Counter()  # by outcome: ok, failed, timed_out, recomputed
        self.kv_pull_nbytes = 0  # bytes received by pulls that completed
        self.scheduler = DecodeScheduler(engine, policy, max_num_seqs, max_num_batched_tokens)
        self._requests: dict[RequestId, Request] = {}
        self._pending: deque[_Pull] = deque()
        self._pulling: dict[RequestId, _Pull] = {}
        self._timings: dict[RequestId, dict[str, float]] = {}  # reported on the request's first output
        self._submitted_s: dict[RequestId, float] = {}
        self.max_num_seqs = max_num_seqs
        self.num_failed_steps = 0
        self.idle = False  # the last step ran no batch: the step thread may sleep until new input

    # ---- inputs ----------------------------------------------------------------------------

    def submit(self, req: GenerateRequest, handle: KVHandle | None = None, received_s: float | None = None) -> None:
        """Queue a request; raises ValueError (naming the field) if it can never run here.
        `received_s` (this worker's clock): when the instance got it, as PrefillWorker.submit."""
        if req.request_id in self._requests:
            raise ValueError(f"request_id: {req.request_id!r} is already running on {self.worker_id}")
        r = self.engine.add_request(req)
        if self.engine.layout.num_blocks_for(r.num_tokens + 1) > self.engine.allocator.num_blocks:
            raise ValueError(f"prompt: {r.num_tokens} tokens do not fit this instance's KV cache")
        if handle is not None and self.receiver is None:
            raise ValueError(f"handle: {self.worker_id} runs colocated and cannot pull KV")
        if handle is not None and handle.num_tokens > r.num_tokens:
            raise ValueError(f"handle: covers {handle.num_tokens} tokens, the request has {r.num_tokens}")
        self._requests[r.request_id] = r
        received = self.clock() if received_s is None else received_s
        self._submitted_s[r.request_id] = received
        self.idle = False
        if handle is None:
            self.scheduler.add_waiting(r)
        else:
            r.status = RequestStatus.WAITING_FOR_REMOTE_KVS
            self._pending.append(_Pull(r, handle, received))

    def abort(self, request_id: RequestId) -> bool:
        r = self._requests.pop(request_id, None)
        if r is None:
            return False
        pull = self._pulling.pop(request_id, None)
        if pull is not None:
            self.receiver.abort(pull.transfer)
        # A pull never started leaves the KV pinned on prefill; its lease frees it there.
        self._pending = deque(p for p in self._pending if p.request is not r)
        self.scheduler.remove(r)
        if r.block_table:
            self.engine.free(r)
        r.status = RequestStatus.FINISHED
        self._forget(request_id)
        return True

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Admit pulls, poll transfers, run one batch. Deterministic given inputs and transfer states."""
        self._admit_pulls()
        failures = self._poll_pulls()
        batch = self.scheduler.schedule()
        self.idle = not batch.chunks and not failures
        if not batch.chunks:
            return failures
        now = self.clock()
        for c in batch.chunks:
            rid = c.request.request_id
            if rid not in self._timings and rid in self._submitted_s:
                self._timings[rid] = {"queue_s": now - self._submitted_s[rid], "_start": now}
        try:
            outputs = self.engine.step(batch)
        except Exception as e:  # noqa: BLE001 - contained: the batch's requests fail, the worker lives on
            return failures + self._fail_batch([c.request.request_id for c in batch.chunks], e)
        faultpoints.reached("decode.step", outputs)
        return failures + [self._finish_output(o) for o in outputs]

    def _fail_batch(self, request_ids: list[RequestId], e: Exception) -> list[StepOutput]:
        """A step raised (a poison request, or a fault): end each request of its batch with an error
        output, free its blocks, count it. Nothing advanced (the engine moves state after the forward)."""
        log.exception("step failed on %s; failing its %d requests", self.worker_id, len(request_ids))
        self.num_failed_steps += 1
        outs = failed_step_outputs(self.worker_id, request_ids, e)
        for o in outs:
            self.abort(o.request_id)
        return outs

    def _finish_output(self, out: StepOutput) -> StepOutput:
        rid = out.request_id
        t = self._timings.get(rid)
        if t is not None and rid in self._submitted_s:  # first output of this request here
            del self._submitted_s[rid]
            start = t.pop("_start")
            if "transfer_s" not in t:
                t["prefill_s"] = self.clock() - start
            out = dataclasses.replace(out, timings=dict(t))
        if out.finished:
            r = self._requests.pop(rid)
            self.scheduler.finished(r)
            self._forget(rid)
        return out

    def _admit_pulls(self) -> None:
        """FCFS: allocate destination blocks and start the pull while memory allows (back-pressure)."""
        while self._pending and len(self.scheduler.running) + len(self._pulling) < self.max_num_seqs:
            pull = self._pending[0]
            r, h = pull.request, pull.handle
            # Keep one block per running request in reserve so admitting a pull does not force a preemption.
            reserve = len(self.scheduler.running)
            need = self.engine.layout.num_blocks_for(h.num_tokens)
            if not self.engine.allocator.can_allocate(need + reserve):
                return
            self._pending.popleft()
            assert self.engine.ensure_blocks(r, h.num_tokens)
            pull.transfer = self.receiver.pull(h, list(r.block_table))
            pull.started_s = self.clock()
            self._pulling[r.request_id] = pull
            faultpoints.reached("decode.pull", (r,))  # chaos (pdserve/faultpoints.py): a no-op unless armed

    def _poll_pulls(self) -> list[StepOutput]:
        """Move landed pulls to running; a failed one is recomputed, or (on_failure=fail) ended with
        the error output returned here."""
        from pdserve.kvtransfer.types import TransferStatus

        failures: list[StepOutput] = []
        for rid, pull in list(self._pulling.items()):
            status, error = self.receiver.poll(pull.transfer)
            if status not in (TransferStatus.DONE, TransferStatus.FAILED):
                continue
            del self._pulling[rid]
            r, now = pull.request, self.clock()
            # The transfer ends when the KV lands; waiting for this iteration boundary is decode time.
            ended = self.receiver.ended_s(pull.transfer)
            landed = now if ended is None else min(now, max(pull.started_s, ended))
            self._timings[rid] = {"decode_queue_s": pull.started_s - pull.submitted_s,
                                  "transfer_s": landed - pull.started_s, "_start": now}
            if status is TransferStatus.DONE:
                nbytes = self.receiver.nbytes(pull.transfer)
                self.kv_pulls["ok"] += 1
                self.kv_pull_nbytes += nbytes
                self._timings[rid]["transfer_bytes"] = float(nbytes)
                r.num_computed_tokens = pull.handle.num_tokens
                self.scheduler.add_running(r)
                continue
            self.kv_pulls["timed_out" if (error or "").startswith("timed out") else "failed"] += 1
            if self.on_failure == "fail":
                log.warning("KV pull for %s failed (%s); failing the request (kvtransfer.on_failure=fail)", rid, error)
                self.abort(rid)
                failures.append(StepOutput(rid, (), "", "error", error=f"KV transfer failed: {error}"))
            else:  # the KV is lost; this engine can prefill, so recompute instead of failing the request
                log.warning("KV pull for %s failed (%s); recomputing locally", rid, error)
                self.kv_pulls["recomputed"] += 1
                self._timings[rid]["kv_recomputed"] = 1.0
                r.num_computed_tokens = 0
                self.scheduler.add_waiting(r)
        return failures

    def _forget(self, rid: RequestId) -> None:
        self._timings.pop(rid, None)
        self._submitted_s.pop(rid, None)

    def run_to_completion(self, reqs: list[GenerateRequest]) -> list[list[int]]:
        """Offline use (tests, benchmarks): submit `reqs`, step until none is left, and return the
        tokens each one produced, in order."""
        for r in reqs:
            self.submit(r)
        out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        while self.has_work():
            for o in self.step():
                out[o.request_id].extend(o.token_ids)
        return [out[r.request_id] for r in reqs]

    # ---- introspection ---------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._requests)

    def step_log(self, since: int = 0) -> tuple[int, list[StepRecord]]:
        """The engine's steps numbered `since` onwards (engine/step_log.py)."""
        return self.engine.step_log.since(since)

    def stats(self) -> WorkerStats:
        a = self.engine.allocator
        return WorkerStats(
            worker_id=self.worker_id,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._pending) + len(self._pulling),
            num_free_blocks=a.num_free, num_total_blocks=a.num_blocks,
            busy_s=self.engine.busy_s, num_steps=self.engine.num_steps, num_step_tokens=self.engine.num_step_tokens,
            outstanding_tokens=sum(r.num_uncomputed_tokens for r in self.scheduler.waiting),
            kv_pulls=dict(self.kv_pulls), kv_pull_nbytes=self.kv_pull_nbytes,
            num_failed_steps=self.num_failed_steps,
        )
