"""PrefillScheduler: FCFS batching of waiting prompts under a token budget and the free blocks.

Blocks exported for decode to pull stay allocated until decode releases them, so a decode pool
that falls behind fills this pool and stops admission here: that is the back-pressure. A prompt
longer than the budget is prefilled in budget-sized chunks over several steps.
"""

from __future__ import annotations

from collections import deque

from pdserve.engine.batch import Batch, Chunk
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, RequestStatus


class PrefillScheduler:
    def __init__(self, engine: Engine, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.engine = engine
        self.max_num_seqs, self.token_budget = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        if req in self.waiting:
            self.waiting.remove(req)

    def schedule(self) -> Batch:
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
            chunks.append(Chunk(req, n))
            budget -= n
        return Batch(tuple(chunks))

    def done(self, req: Request) -> None:
        """`req` sampled its first token and leaves the prefill queue."""
        self.waiting.remove(req)

    @property
    def outstanding_tokens(self) -> int:
        return sum(r.num_uncomputed_tokens for r in self.waiting)
