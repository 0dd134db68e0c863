"""DecodeScheduler: continuous batching for the decode role, and the colocated policies.

Queues: `waiting` holds requests that need (re)computing here — colocated arrivals, pulls that
failed, preempted requests — and `running` holds requests whose KV is complete up to their last
token. Policies (what colocated serving compares against):

  decode            disaggregated decode: running requests step one token each; `waiting` only
                    holds recomputes, which are chunked in after the decodes.
  prefill_priority  vLLM's default: if a waiting prompt fits, run a prefill-only step; else decode.
  chunked           Sarathi: every step decodes all running requests, then fills the remaining
                    token budget with prefill chunks of waiting requests.

When a running request cannot get a block for its next token, the newest running request is
preempted by recompute: its blocks are freed and it goes back to the front of `waiting`.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from pdserve.engine.batch import Batch, Chunk
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, RequestStatus

Policy = Literal["decode", "prefill_priority", "chunked"]


class DecodeScheduler:
    def __init__(self, engine: Engine, policy: Policy, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.engine, self.policy = engine, policy
        self.max_num_seqs, self.token_budget = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_waiting(self, req: Request, front: bool = False) -> None:
        req.status = RequestStatus.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(req)

    def add_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        if self.policy == "prefill_priority":
            prefills = self._schedule_prefills(self.token_budget, chunk=False)
            if prefills:
                return Batch(tuple(prefills))
            return Batch(tuple(self._schedule_decodes()))
        decodes = self._schedule_decodes()
        budget = self.token_budget - len(decodes)
        return Batch(tuple(decodes + self._schedule_prefills(budget, chunk=True)))

    def _schedule_decodes(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        for req in list(self.running):
            if req not in self.running:
                continue  # preempted below to make room for an older request
            while not self.engine.ensure_blocks(req, req.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            else:
                chunks.append(Chunk(req, req.num_uncomputed_tokens))
        return chunks

    def _schedule_prefills(self, budget: int, chunk: bool) -> list[Chunk]:
        """FCFS over `waiting` while budget, sequence slots and blocks last."""
        chunks: list[Chunk] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            reused = self.engine.reuse_prefix(req)
            n = req.num_uncomputed_tokens
            if n > budget and chunk:
                n = budget
            elif n > budget and chunks:
                if reused:
                    self.engine.free(req)  # a waiting request holds no cached blocks
                break  # whole-prompt policy: a lone over-budget prompt still runs, alone
            if not self._ensure_blocks(req, req.num_computed_tokens + n, reused):
                break
            self.waiting.popleft()
            chunks.append(Chunk(req, n))
            budget -= n
            if req.num_computed_tokens + n == req.num_tokens:
                self.add_running(req)
            else:
                req.status = RequestStatus.RUNNING
                self.waiting.appendleft(req)  # a partial chunk: the rest goes next step, first in line
                break
        return chunks

    def _ensure_blocks(self, req: Request, num_tokens: int, reused: int) -> bool:
        """Blocks for the head of `waiting`. If memory is short and nothing runs (nothing will free
        blocks), the other waiting requests give up theirs (partial chunks, reused prefixes) and are
        recomputed later; a reused prefix is dropped when its request cannot start now."""
        if self.engine.ensure_blocks(req, num_tokens):
            return True
        holders = [r for r in self.waiting if r is not req and r.block_table]
        if not self.running and holders:
            for r in holders:
                self.engine.free(r)
                self.num_preemptions += 1
            if self.engine.ensure_blocks(req, num_tokens):
                return True
        if reused:
            self.engine.free(req)
        return False

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.engine.free(req)
        self.add_waiting(req, front=True)
        self.num_preemptions += 1

    def finished(self, req: Request) -> None:
        self.remove(req)
