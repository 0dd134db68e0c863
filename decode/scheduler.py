"""DecodeScheduler: the decode role's queues and the life of each request in them (and the colocated
policies). The worker around it only wires the engine and the KV receiver to it.

Queues (each request is in exactly one, indexed by id in `requests`):

  awaiting_kv   its KV waits on a prefill instance. Admitted FCFS (`admit_pulls`) while a sequence
                slot and its blocks are free, keeping one block per running request in reserve;
                then it holds its blocks and its pull runs until `pull_done` / `pull_failed`.
                With prefix caching, the prefix this instance already caches is reused and only
                the rest is pulled (a delta pull); a landed pull's blocks join the cache.
  waiting       to be (re)computed here: colocated arrivals, local prefills, failed pulls to
                recompute (their blocks freed first), preempted. Only the head of `waiting` holds
                blocks while it waits.
  running       KV complete up to the last token; one token per step.
  held          (layer-wise streaming) dispatched before prefill sampled the first token: the KV
                landed (its blocks held), or the pull failed and the prompt is to be recomputed (no
                blocks), and the request waits for `first_token` before it may run (or recompute).

`max_num_seqs` bounds running + pulling + held requests together. Policies (what colocated serving
compares against):

  decode            disaggregated decode: running requests step one token each; `waiting` holds
                    recomputes and local prefills (conditional disaggregation), chunked into what
                    the decodes leave of `max_num_batched_tokens` (the decodes themselves always run).
  prefill_priority  vLLM's default: if a waiting prompt fits, run a prefill-only step; else decode.
  chunked           Sarathi: every step decodes all running requests, then fills the remaining
                    token budget with prefill chunks of waiting requests.

When a running request cannot get a block for its next token, the newest running request is
preempted by recompute: its blocks are freed and it goes back to the front of `waiting`.
`update` (after each engine step) appends the sampled tokens, applies the stop conditions, and
finishes the requests that ended: blocks freed, out of every queue.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Literal, get_args

from pdserve.config import OnFailure, ServingConfig
from pdserve.engine.batch import Batch, Chunk
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, RequestStatus, append_token
from pdserve.types import FinishReason, LatencyBreakdown, PullOutcome, RequestId, StepOutput

Policy = Literal["decode", "prefill_priority", "chunked"]


@dataclass(frozen=True)
class DecodeOptions:
    """How a decode instance schedules: `policy`, at most `max_num_seqs` requests running or
    pulling, `max_num_batched_tokens` per step, and what a failed KV pull does (`on_failure`:
    recompute the prompt here, or fail the request). Raises ValueError naming a bad field."""

    policy: Policy = "decode"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    on_failure: OnFailure = "recompute"

    def __post_init__(self) -> None:
        for name, allowed in (("policy", Policy), ("on_failure", OnFailure)):
            if getattr(self, name) not in get_args(allowed):
                raise ValueError(f"{name}: must be one of {get_args(allowed)}, got {getattr(self, name)!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")


def decode_options(cfg: ServingConfig) -> DecodeOptions:
    """A serving config's decode scheduling: the colocated policy in colocated mode, else "decode"."""
    policy = cfg.colocated_policy if cfg.mode == "colocated" else "decode"
    return DecodeOptions(policy, cfg.decode.max_num_seqs, cfg.decode.max_num_batched_tokens, cfg.kvtransfer.on_failure)


class DecodeScheduler:
    def __init__(self, engine: Engine, options: DecodeOptions) -> None:
        self.engine, self.options = engine, options
        self.policy, self.max_num_seqs = options.policy, options.max_num_seqs
        self.token_budget = options.max_num_batched_tokens
        self.requests: dict[RequestId, Request] = {}
        self.awaiting_kv: deque[Request] = deque()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.held: list[Request] = []
        self.first_pending: set[RequestId] = set()  # streamed handoffs whose first token has not come
        self.num_preemptions = 0
        self.kv_pulls: Counter[str] = Counter()  # by outcome: ok, failed, timed_out, recomputed
        self.kv_pull_nbytes = 0  # bytes received by pulls that completed

    # ---- arrivals and departures -----------------------------------------------------------

    def add(self, req: Request, now: float, first_pending: bool = False) -> None:
        """Take a new request (its `kv_handle` set when its KV is to be pulled), queued from `now`.
        `first_pending`: a streamed handoff; it runs only after `first_token`."""
        assert req.request_id not in self.requests, req.request_id
        self.requests[req.request_id] = req
        if first_pending:
            assert req.kv_handle is not None, "only a pulled request waits for its first token"
            self.first_pending.add(req.request_id)
        else:
            req.first_token_s = now  # it came with the request (or there is none to wait for)
        req.queued_s = now
        if req.kv_handle is None:
            self.add_waiting(req)
        else:
            req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
            self.awaiting_kv.append(req)

    def add_waiting(self, req: Request, front: bool = False) -> None:
        req.status = RequestStatus.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(req)

    def add_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End `req` here: out of every queue and the index, blocks freed (abort a running pull first)."""
        for queue in (self.running, self.waiting, self.awaiting_kv, self.held):
            if req in queue:
                queue.remove(req)
        self.requests.pop(req.request_id, None)
        self.first_pending.discard(req.request_id)
        self.engine.free(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason

    def has_work(self) -> bool:
        """Something for the step loop to do (a held request only waits for input: no polling)."""
        return bool(self.running or self.waiting or self.awaiting_kv)

    def first_token(self, req: Request, token_ids: tuple[int, ...], now: float) -> None:
        """The first token(s) prefill sampled for a streamed handoff `req`, exactly as a request that
        arrived with them in `output_token_ids` carries them (the detokenizer state included; their
        text was emitted by the router already). A held request runs (or recomputes) from now."""
        self.first_pending.discard(req.request_id)
        req.first_token_s = now
        for t in token_ids:
            req.output_token_ids.append(t)
            if req.detokenizer is not None:
                req.detokenizer.add([t])
        if req in self.held:
            self.held.remove(req)
            if req.kv_pull_landed:
                self.add_running(req)
            else:
                self.add_waiting(req)

    # ---- KV pulls --------------------------------------------------------------------------

    def pulling(self) -> list[Request]:
        """Requests whose pull runs: admitted (blocks given) and not landed yet."""
        return [r for r in self.awaiting_kv if r.block_table]

    def admit_pulls(self, now: float) -> list[Request]:
        """FCFS: give destination blocks to the requests whose pull may start now (back-pressure:
        the rest keep their KV pinned on prefill). The caller starts each pull."""
        admitted: list[Request] = []
        num_seqs = len(self.running) + len(self.pulling()) + len(self.held)
        for req in self.awaiting_kv:
            if req.block_table:
                continue
            # a delta pull: the prefix this instance caches (leaving at least one token to pull) stays
            reused = self.engine.reuse_prefix(req, max_tokens=req.kv_handle.num_tokens - 1)
            # one block per running request in reserve, so a pull does not force a preemption
            need = self.engine.blocks_needed(req, req.kv_handle.num_tokens) + len(self.running)
            if num_seqs >= self.max_num_seqs or not self.engine.allocator.can_allocate(need):
                if reused:
                    self.engine.free(req)  # a request waiting for memory holds no blocks
                break
            assert self.engine.ensure_blocks(req, req.kv_handle.num_tokens)
            req.pull_started_s = now
            admitted.append(req)
            num_seqs += 1
        return admitted

    def pull_done(self, req: Request, landed_s: float, nbytes: int) -> None:
        """The KV landed at `landed_s`: the request runs from its pulled tokens on."""
        self.awaiting_kv.remove(req)
        self.kv_pulls["ok"] += 1
        self.kv_pull_nbytes += nbytes
        req.latency += self._pull_latency(req, landed_s, "ok", nbytes)
        req.latency += LatencyBreakdown(pull_skipped_tokens=req.num_computed_tokens)
        req.num_computed_tokens, req.kv_transfer = req.kv_handle.num_tokens, None
        self.engine.cache_computed(req)  # the pulled prompt's blocks serve the conversation's next turn
        self._run_or_hold(req, self.add_running)

    def _run_or_hold(self, req: Request, then: Callable[[Request], None]) -> None:
        if req.request_id in self.first_pending:
            self.held.append(req)
        else:
            then(req)

    def pull_failed(self, req: Request, outcome: PullOutcome, error: str | None, now: float) -> StepOutput | None:
        """The pull ended without the KV: recompute the prompt here (counted, flagged in the
        request's latency), or with on_failure=fail end the request with the error output returned."""
        self.awaiting_kv.remove(req)
        self.kv_pulls[outcome] += 1
        req.latency += self._pull_latency(req, now, outcome, None)
        req.kv_transfer = None
        if self.options.on_failure == "fail":
            self.finish(req, "error")
            return StepOutput(req.request_id, (), "", "error", error=f"KV transfer failed: {error}")
        self.kv_pulls["recomputed"] += 1
        req.latency += LatencyBreakdown(kv_recomputed=True)
        self.engine.free(req)  # blocks back (a cached prefix among them is found again when it runs)
        req.queued_s, req.scheduled_s = now, None
        self._run_or_hold(req, self.add_waiting)
        return None

    def recompute_without_pull(self, req: Request) -> None:
        """A disaggregated request that came without KV to pull (its prefill failed or was lost, or
        decode died mid-stream): computed here, as a failed pull is, and as visible (counted, flagged)."""
        self.kv_pulls["recomputed"] += 1
        req.latency += LatencyBreakdown(kv_recomputed=True)

    @staticmethod
    def _pull_latency(req: Request, ended_s: float, outcome: PullOutcome, nbytes: int | None) -> LatencyBreakdown:
        """The pull's part; `kv_exposed_s`: how much of it ran after decode had the first token
        (all of it without streaming, where the first token comes with the handle)."""
        started = req.pull_started_s if req.pull_started_s is not None else ended_s
        had_first = max(started, ended_s if req.first_token_s is None else req.first_token_s)
        return LatencyBreakdown(decode_queue_s=started - req.queued_s, transfer_s=max(0.0, ended_s - started),
                                transfer_bytes=nbytes, kv_pull=outcome, kv_exposed_s=max(0.0, ended_s - had_first))

    # ---- steps -----------------------------------------------------------------------------

    def schedule(self, now: float) -> Batch:
        """The next step's batch under the policy; stamps each request's first run at `now`."""
        if self.policy == "prefill_priority":
            chunks = self._schedule_prefills(self.token_budget, chunk=False) or self._schedule_decodes()
        else:
            decodes = self._schedule_decodes()
            chunks = decodes + self._schedule_prefills(self.token_budget - len(decodes), chunk=True)
        for c in chunks:
            if c.request.scheduled_s is None:
                c.request.scheduled_s = now
        return Batch(tuple(chunks))

    def update(self, sampled: list[tuple[Request, int]], now: float) -> list[StepOutput]:
        """After `engine.step`: append each sampled token, apply the stop conditions, finish the
        requests that ended. The first output of a request carries its latency on this instance."""
        outputs = []
        for req, token in sampled:
            out = append_token(req, token, self.engine.eos_token_ids, self.engine.max_model_len)
            latency = req.first_latency(now)
            if latency is not None:
                out = StepOutput(out.request_id, out.token_ids, out.text, out.finish_reason, latency=latency)
            if out.finished:
                self.finish(req, req.finish_reason or "stop")
            outputs.append(out)
        return outputs

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
        num_pulling = len(self.pulling()) + len(self.held)
        while self.waiting and budget > 0 and len(self.running) + num_pulling < self.max_num_seqs:
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
