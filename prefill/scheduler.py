"""PrefillScheduler: the prefill role's queues and the life of each request in them.

  waiting      FCFS batching under a token budget, `max_num_seqs` and the free blocks; a prompt
               longer than the budget is prefilled in budget-sized chunks over several steps.
  handed_off   first token sampled and KV exported (`kv_handle`): the sender pins the blocks until
               decode releases them or the lease expires (`released`). Status HANDED_OFF: this
               instance's part is over, and it is not a finish the client sees.

Exported blocks stay allocated until decode releases them, so a decode pool that falls behind
fills this pool and stops admission here: that is the back-pressure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pdserve.engine.batch import Batch, Chunk
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, RequestStatus, append_token
from pdserve.types import FinishReason, RequestId, StepOutput

if TYPE_CHECKING:
    from pdserve.kvtransfer.types import KVHandle


class PrefillScheduler:
    def __init__(self, engine: Engine, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.engine = engine
        self.max_num_seqs, self.token_budget = max_num_seqs, max_num_batched_tokens
        self.requests: dict[RequestId, Request] = {}  # the requests in `waiting`, by id
        self.waiting: deque[Request] = deque()
        self.handed_off: dict[str, Request] = {}  # by the export's handle id

    def add(self, req: Request, now: float) -> None:
        """Queue a new request, waiting since `now`."""
        assert req.request_id not in self.requests, req.request_id
        self.requests[req.request_id] = req
        req.status, req.queued_s = RequestStatus.WAITING, now
        self.waiting.append(req)

    def schedule(self, now: float) -> Batch:
        chunks: list[Chunk] = []
        budget = self.token_budget
        for req in self.waiting:
            if budget == 0 or len(chunks) == self.max_num_seqs:
                break
            reused = self.engine.reuse_prefix(req)
            n = min(req.num_uncomputed_tokens, budget)
            if not self.engine.ensure_blocks(req, req.num_computed_tokens + n):
                if reused:
                    self.engine.free(req)  # a waiting request holds no cached blocks
                break  # FCFS: no overtaking a request that waits for memory
            req.status = RequestStatus.RUNNING
            if req.scheduled_s is None:
                req.scheduled_s = now
            chunks.append(Chunk(req, n))
            budget -= n
        return Batch(tuple(chunks))

    def update(self, sampled: list[tuple[Request, int]], now: float) -> list[tuple[Request, StepOutput]]:
        """After `engine.step`: each request that sampled its first token leaves `waiting`, with its
        output (carrying its latency here). One that ended at that token is finished (blocks freed);
        the others are HANDED_OFF, their blocks held until the caller `exported` them."""
        results = []
        for req, token in sampled:
            out = append_token(req, token, self.engine.eos_token_ids, self.engine.max_model_len)
            latency = req.first_latency(now)
            out = StepOutput(out.request_id, out.token_ids, out.text, out.finish_reason, latency=latency)
            if out.finished:
                self.finish(req, req.finish_reason or "stop")
            else:
                self.waiting.remove(req)
                del self.requests[req.request_id]
                req.status = RequestStatus.HANDED_OFF
            results.append((req, out))
        return results

    def exported(self, req: Request, handle: KVHandle) -> None:
        """`req`'s KV is exported under `handle` (the sender's reference pins its blocks): drop the
        request's own reference and keep it until decode releases the handle."""
        req.kv_handle = handle
        self.engine.free(req)
        self.handed_off[handle.handle_id] = req

    def released(self, handle_ids: Iterable[str]) -> None:
        """The sender freed these exports' blocks (decode released them, or their lease expired)."""
        for h in handle_ids:
            self.handed_off.pop(h, None)

    def exports_of(self, request_id: RequestId) -> list[str]:
        """The handle ids under which `request_id`'s KV is still exported (at most one, normally)."""
        return [h for h, r in self.handed_off.items() if r.request_id == request_id]

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a queued request here: out of the queue and the index, blocks freed."""
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)
        self.engine.free(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason

    @property
    def outstanding_tokens(self) -> int:
        return sum(r.num_uncomputed_tokens for r in self.waiting)
