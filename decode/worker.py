"""DecodeWorker: engine + DecodeScheduler + KV receiver, wired. Plain class; decode/actor.py is its Ray shell.

A request arrives with a KVHandle (disaggregated), or without one: colocated, a local prefill the
router chose (`GenerateRequest.local_prefill`, conditional disaggregation), or a request to recompute
after a failure (re-dispatched, or no prefill instance: counted and flagged `kv_recomputed`, as a
failed pull is); the scheduler owns it from then on (decode/scheduler.py). Block ownership
through a pulled request's life:

  awaiting    no blocks here; KV is pinned on prefill until we pull (back-pressure under bursts)
  pulling     blocks allocated here and owned by the request (a prefix found in this instance's
              prefix cache shared with others); the receiver writes the rest
  running     owned by the request; freed by the scheduler when it finishes (cached blocks stay
              findable until evicted)
  failed pull on_failure=recompute: freed, recomputed here (counted, and flagged
              `kv_recomputed` in the request's latency); on_failure=fail: freed here, the request
              ends with an error output
  aborted     freed here; the receiver tells prefill to release the source blocks

Layer-wise streaming: a request may arrive with a handle that covers every one of its tokens, i.e.
before prefill sampled the first token. Its pull starts as usual (and runs while the prefill forward
writes the layers); the request is then held until `first_token` brings that token.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from pdserve import faultpoints
from pdserve.decode.scheduler import DecodeOptions, DecodeScheduler
from pdserve.engine.engine import Engine, failed_step_outputs
from pdserve.types import GenerateRequest, RequestId, StepOutput, StepRecord, WorkerStats

if TYPE_CHECKING:
    from pdserve.kvtransfer.protocols import KVSink
    from pdserve.kvtransfer.types import KVHandle

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, engine: Engine, options: DecodeOptions, receiver: KVSink[Any] | None = None, worker_id: str = "decode-0",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine, self.receiver, self.worker_id, self.clock = engine, receiver, worker_id, clock
        self.scheduler = DecodeScheduler(engine, options)
        self.num_failed_steps = 0
        self.idle = False  # the last step ran no batch: the step thread may sleep until new input

    # ---- inputs ----------------------------------------------------------------------------

    def submit(self, req: GenerateRequest, handle: KVHandle | None = None, received_s: float | None = None) -> None:
        """Queue a request; raises ValueError (naming the field) if it can never run here.
        `received_s` (this worker's clock): when the instance got it, as PrefillWorker.submit."""
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"request_id: {req.request_id!r} is already running on {self.worker_id}")
        r = self.engine.add_request(req)
        if self.engine.layout.num_blocks_for(r.num_tokens + 1) > self.engine.allocator.num_blocks:
            raise ValueError(f"prompt: {r.num_tokens} tokens do not fit this instance's KV cache")
        if handle is not None and self.receiver is None:
            raise ValueError(f"handle: {self.worker_id} runs colocated and cannot pull KV")
        if handle is not None and handle.num_tokens > r.num_tokens:
            raise ValueError(f"handle: covers {handle.num_tokens} tokens, the request has {r.num_tokens}")
        r.kv_handle = handle
        if handle is None and self.receiver is not None and not req.local_prefill:
            self.scheduler.recompute_without_pull(r)  # not a prefill the router chose: a fallback
        first_pending = handle is not None and handle.num_tokens == r.num_tokens  # streamed: no first token yet
        self.scheduler.add(r, self.clock() if received_s is None else received_s, first_pending)
        self.idle = False

    def first_token(self, request_id: RequestId, token_ids: tuple[int, ...]) -> bool:
        """Prefill's first token(s) for a request submitted with a streamed handle (see the module
        docstring). False if the request is not here (aborted, or failed) or does not wait for them."""
        r = self.scheduler.requests.get(request_id)
        if r is None or request_id not in self.scheduler.first_pending:
            return False
        self.scheduler.first_token(r, tuple(token_ids), self.clock())
        self.idle = False
        return True

    def abort(self, request_id: RequestId) -> bool:
        r = self.scheduler.requests.get(request_id)
        if r is None:
            return False
        if r.kv_transfer is not None:  # stop the receiver writing into the blocks before they are freed
            self.receiver.abort(r.kv_transfer)
            r.kv_transfer = None
        # A pull never started leaves the KV pinned on prefill; its lease frees it there.
        self.scheduler.finish(r, "abort")
        return True

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Start admitted pulls, poll transfers, run one batch. Deterministic given inputs and transfer states."""
        for r in self.scheduler.admit_pulls(self.clock()):
            r.kv_transfer = self.receiver.pull(r.kv_handle, list(r.block_table), r.num_computed_tokens)
            faultpoints.reached("decode.pull", (r,))  # chaos (pdserve/faultpoints.py): a no-op unless armed
        failures = self._poll_pulls()
        batch = self.scheduler.schedule(self.clock())
        self.idle = not batch.chunks and not failures
        if not batch.chunks:
            return failures
        faultpoints.reached("decode.step", batch.chunks)
        try:
            sampled = self.engine.step(batch)
        except Exception as e:  # noqa: BLE001 - contained: the batch's requests fail, the worker lives on
            return failures + self._fail_batch([c.request.request_id for c in batch.chunks], e)
        return failures + self.scheduler.update(sampled, self.clock())

    def _fail_batch(self, request_ids: list[RequestId], e: Exception) -> list[StepOutput]:
        """A step raised (a poison request, or a fault): end each request of its batch with an error
        output, free its blocks, count it. Nothing advanced (the engine moves state after the forward)."""
        log.exception("step failed on %s; failing its %d requests", self.worker_id, len(request_ids))
        self.num_failed_steps += 1
        outs = failed_step_outputs(self.worker_id, request_ids, e)
        for o in outs:
            self.abort(o.request_id)
        return outs

    def _poll_pulls(self) -> list[StepOutput]:
        """Hand each pull that ended to the scheduler; returns the error outputs of requests that
        failed with it (on_failure=fail)."""
        from pdserve.kvtransfer.types import TransferStatus

        failures: list[StepOutput] = []
        for r in self.scheduler.pulling():
            status, error = self.receiver.poll(r.kv_transfer)
            if status not in (TransferStatus.DONE, TransferStatus.FAILED):
                continue
            now = self.clock()
            if status is TransferStatus.DONE:
                # The transfer ends when the KV lands; waiting for this iteration boundary is decode time.
                ended = self.receiver.ended_s(r.kv_transfer)
                landed = now if ended is None else min(now, max(r.pull_started_s or now, ended))
                self.scheduler.pull_done(r, landed, self.receiver.nbytes(r.kv_transfer))
                continue
            log.warning("KV pull for %s failed (%s); %s (kvtransfer.on_failure)", r.request_id, error,
                        "failing the request" if self.scheduler.options.on_failure == "fail" else "recomputing locally")
            outcome = "timed_out" if (error or "").startswith("timed out") else "failed"
            out = self.scheduler.pull_failed(r, outcome, error, now)
            if out is not None:
                failures.append(out)
        return failures

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
        return self.scheduler.has_work()

    def step_log(self, since: int = 0) -> tuple[int, list[StepRecord]]:
        """The engine's steps numbered `since` onwards (engine/step_log.py)."""
        return self.engine.step_log.since(since)

    def stats(self) -> WorkerStats:
        a, s = self.engine.allocator, self.scheduler
        return WorkerStats(
            worker_id=self.worker_id,
            num_running=len(s.running),
            num_waiting=len(s.waiting) + len(s.awaiting_kv),
            num_free_blocks=a.num_free, num_total_blocks=a.num_blocks,
            outstanding_tokens=sum(r.num_uncomputed_tokens for r in s.waiting),
            kv_pulls=dict(s.kv_pulls), kv_pull_nbytes=s.kv_pull_nbytes,
            num_failed_steps=self.num_failed_steps,
            max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.token_budget,
            block_size=self.engine.layout.block_size,
            **self.engine.counters(),
        )
