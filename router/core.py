"""The router core: admission, dispatch and the life of each request across the pools. No HTTP, no Ray.

    submit ─► [prefill instance] ─first token─► [decode instance + KVHandle] ─tokens…─► finished
       │ (colocated: straight to a decode instance with handle None)
       └ over `max_pending_requests` → OverloadedError (429); no healthy decode → UnavailableError (503)

A prefill instance that dies is replaced by another; with none left, decode recomputes the prompt.
A decode instance that dies mid-stream is replaced by another healthy one (after waiting up to
`failover_wait_s` for one to come back), which recomputes prompt + the tokens already streamed
(`GenerateRequest.output_token_ids`); past `max_attempts` the request ends with an explicit error
output. Closing a `RequestStream` early (client gone, timeout) aborts it on every worker holding it.

Layer-wise streaming (router/layerwise.py): decode gets the request and KV handle before prefill's forward.
Conditional disaggregation (router/conditional.py): the decode instance may be chosen first and
prefill the prompt itself (a local prefill, no KV handle); the decision is in the request's breakdown.

A step that raises on a worker fails only the requests of its batch (the worker stays in its pool):
each is retried once, on another instance when there is one; a request whose step fails twice is a
poison request and ends with an explicit error, never replayed across the pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pdserve.config import Mode, RouterConfig
from pdserve.router.conditional import ConditionalDispatch, CountedPrefill
from pdserve.router.errors import (
    InvalidRequestError,
    OverloadedError,
    RequestFailedError,
    UnavailableError,
    WorkerDeadError,
)
from pdserve.router.layerwise import EarlyDecode
from pdserve.router.policies import decode_policy, prefill_policy
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.pool import Instance, Pool
from pdserve.router.protocols import DecodeClient, PrefillClient, StreamingDecodeClient, StreamingPrefillClient
from pdserve.router.stream import RequestStream
from pdserve.types import GenerateRequest, LatencyBreakdown, PrefillResult, RequestId, StepOutput

if TYPE_CHECKING:
    from pdserve.kvtransfer.types import KVHandle

Clock = Callable[[], float]
_Prefilled = tuple[StepOutput | None, "KVHandle | None", EarlyDecode | None]  # first token, handle, early decode


@dataclass
class _State:
    request: GenerateRequest
    arrival_s: float
    output_ids: list[int] = field(default_factory=list)
    holders: list[tuple[Pool[Any], str]] = field(default_factory=list)  # every instance given the request
    latency: LatencyBreakdown = field(default_factory=LatencyBreakdown)  # the workers' parts, all roles and attempts
    first_token_s: float | None = None
    finish_reason: str | None = None
    released: bool = False


class Router:
    """Request state and dispatch for one serving system (both modes)."""

    def __init__(self, cfg: RouterConfig, mode: Mode = "disaggregated", *, clock: Clock = time.monotonic,
                 failover_wait_s: float = 30.0, max_attempts: int = 4, prefix_block_size: int | None = None) -> None:
        """`prefix_block_size`: the instances' KV block size when they cache prefixes (engine.
        enable_prefix_caching): both pools then keep a PrefixIndex for the cache-aware policies."""
        self.cfg, self.mode, self.clock = cfg, mode, clock
        self.layerwise = False  # True: stream KV handoffs (clients are Streaming*Clients, router/protocols.py)
        self.conditional = ConditionalDispatch.from_config(cfg, mode)  # None: every prompt to the prefill pool
        self.failover_wait_s, self.max_attempts = failover_wait_s, max_attempts
        self.prefill: Pool[PrefillClient] = Pool("prefill", prefill_policy(cfg.prefill_policy))
        self.decode: Pool[DecodeClient] = Pool("decode", decode_policy(cfg.decode_policy))
        if prefix_block_size is not None:
            for pool in (self.prefill, self.decode):
                pool.prefix, pool.prefix_block_size = PrefixIndex(), prefix_block_size
        self.requests: dict[RequestId, _State] = {}
        self.num_redispatched = 0
        self.num_retried = 0  # requests retried once after a worker's step failed on them
        self.num_poison = 0  # requests ended because their step failed twice
        self.probe_interval_s = 0.2

    def add_prefill(self, worker_id: str, client: PrefillClient) -> None:
        self.prefill.add(worker_id, client)

    def add_decode(self, worker_id: str, client: DecodeClient) -> None:
        self.decode.add(worker_id, client)

    def remove(self, worker_id: str) -> None:
        self.prefill.remove(worker_id)
        self.decode.remove(worker_id)

    def submit(self, req: GenerateRequest) -> RequestStream:
        """Admit `req` or raise `OverloadedError`/`UnavailableError`; iterate the stream for outputs."""
        if len(self.requests) >= self.cfg.max_pending_requests:
            raise OverloadedError(f"{len(self.requests)} requests pending, the limit is "
                                  f"{self.cfg.max_pending_requests}", retry_after_s=1.0)
        if not self.decode.healthy():
            raise UnavailableError("no healthy decode instance", retry_after_s=5.0)
        assert req.request_id not in self.requests, f"duplicate request id {req.request_id}"
        st = _State(req, req.arrival_s or self.clock(), output_ids=list(req.output_token_ids))
        self.requests[req.request_id] = st
        return RequestStream(req.request_id, self._lifecycle(st), lambda: self._release(st))

    async def refresh_stats(self, timeout_s: float = 2.0) -> None:
        await asyncio.gather(self.prefill.refresh(timeout_s), self.decode.refresh(timeout_s))

    async def _lifecycle(self, st: _State) -> AsyncGenerator[StepOutput, None]:
        try:
            handle: KVHandle | None = None
            early: EarlyDecode | None = None
            if self.mode == "disaggregated" and not st.output_ids and not (early := self._local_prefill(st)):
                if self.layerwise:
                    first, handle, early = await self._run_prefill_layerwise(st)
                else:
                    first, handle = await self._run_prefill(st)
                if first is not None:
                    yield self._emit(st, first)
                    if first.finished:
                        return
            async with aclosing(self._run_decode(st, handle, early)) as outs:
                async for out in outs:
                    yield self._emit(st, out)
                    if out.finished:
                        return
        finally:
            await self._release(st)

    def _local_prefill(self, st: _State) -> EarlyDecode | None:
        """Conditional disaggregation (router/conditional.py): the decision, recorded in the request's
        breakdown; when local, the decode instance is given the request now, to prefill it itself."""
        picked = None if self.conditional is None else self.conditional.decide(st.request, self.prefill, self.decode)
        if picked is None:
            return None
        inst, decision = picked
        st.latency += decision.latency()
        if not decision.local:
            return None
        self.decode.commit(st.request, inst)
        stream = self._open_decode(st, inst, None, local=True)
        return EarlyDecode(inst, CountedPrefill(inst, decision.uncached_tokens, stream))

    async def _run_prefill(self, st: _State, failed_on: str | None = None) -> tuple[StepOutput | None, KVHandle | None]:
        """First token and KV handle, or (None, None) when no prefill instance could do it.
        `failed_on`: the instance whose step already failed on this request once."""
        n = len(st.request.prompt_token_ids)
        for _ in range(self.max_attempts):
            inst = self.prefill.pick(st.request, avoid=failed_on)
            if inst is None:
                return None, None
            client = inst.client
            st.holders.append((self.prefill, inst.worker_id))
            inst.outstanding_tokens += n
            try:
                result = await client.prefill(st.request)
            except WorkerDeadError as e:
                self.prefill.mark_dead(inst.worker_id, client, e)
                continue
            except InvalidRequestError:
                raise  # the client's fault: the server answers 400
            except RequestFailedError as e:
                return self._error(st, f"prefill failed: {e}"), None
            finally:
                inst.outstanding_tokens -= n
            if result.first.finish_reason == "error":
                if failed_on is None:
                    failed_on = self._retry_once(inst.worker_id)
                    continue
                return self._poison(st, failed_on, inst.worker_id, result.first.error), None
            return result.first, result.handle
        return None, None

    async def _run_prefill_layerwise(self, st: _State) -> _Prefilled:
        """As `_run_prefill`, dispatching decode (3rd item) once prefill exported the KV; failures abort it."""
        n = len(st.request.prompt_token_ids)
        inst = self.prefill.pick(st.request)
        if inst is None:
            return None, None, None
        client: StreamingPrefillClient = inst.client  # type: ignore[assignment]
        st.holders.append((self.prefill, inst.worker_id))
        inst.outstanding_tokens += n
        early: EarlyDecode | None = None
        try:
            async with aclosing(client.prefill_stream(st.request)) as items:
                async for item in items:
                    if isinstance(item, PrefillResult):
                        return await self._streamed_first(st, inst.worker_id, item, early)
                    picked = self.decode.pick(st.request)  # dispatch now, with the KV still being written
                    early = EarlyDecode(picked, self._open_decode(st, picked, item)) if picked else None
            raise RequestFailedError(f"prefill instance {inst.worker_id} ended the stream without a result")
        except WorkerDeadError as e:
            self.prefill.mark_dead(inst.worker_id, client, e)
            await self._close_early(st, early)
            return (*await self._run_prefill(st), None)
        except RequestFailedError as e:
            await self._close_early(st, early)
            if isinstance(e, InvalidRequestError):
                raise
            return self._error(st, f"prefill failed: {e}"), None, None
        finally:
            inst.outstanding_tokens -= n

    async def _streamed_first(self, st: _State, worker_id: str, result: PrefillResult,
                              early: EarlyDecode | None) -> _Prefilled:
        """Prefill's result after an early dispatch (`early`, if a decode instance was free)."""
        first = result.first
        if early is not None and first.finished:  # prefill failed, or the request ended at its first token
            await self._close_early(st, early)
            early = None
        if first.finish_reason == "error":
            return (*await self._run_prefill(st, self._retry_once(worker_id)), None)
        if early is None:
            return first, result.handle, None
        decode: StreamingDecodeClient = early.inst.client  # type: ignore[assignment]
        try:
            if await decode.first_token(st.request.request_id, first.token_ids):
                return first, result.handle, early
        except (WorkerDeadError, RequestFailedError):
            pass  # as if decode had lost it: recompute (the stream, closed here, tells a dead one)
        await self._close_early(st, early)
        await self._abort_on(self.prefill, st)  # the pull ended (decode lost the request): free the export
        self.num_redispatched += 1
        return first, None, None

    async def _close_early(self, st: _State, early: EarlyDecode | None) -> None:
        if early is not None:
            await early.close()
            await self._abort_on(self.decode, st)

    def _open_decode(self, st: _State, inst: Instance[DecodeClient], handle: KVHandle | None,
                     local: bool = False) -> AsyncGenerator[StepOutput, None]:
        """Hand the request (with the tokens streamed so far) to `inst`; counted in its `num_inflight`.
        `local`: a local prefill the router chose (GenerateRequest.local_prefill)."""
        req = dataclasses.replace(st.request, output_token_ids=tuple(st.output_ids), local_prefill=local)
        st.holders.append((self.decode, inst.worker_id))
        inst.num_inflight += 1
        return inst.client.generate(req, handle)

    async def _run_decode(self, st: _State, handle: KVHandle | None,
                          early: EarlyDecode | None = None) -> AsyncGenerator[StepOutput, None]:
        """Stream the request from a decode instance (`early`'s first, if given), re-dispatching on failure."""
        failed_on: str | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                self.num_redispatched += 1
            if early is not None:
                (inst, stream), early = early.take(), None
            else:
                picked = await self._pick_decode(st, avoid=failed_on)
                if picked is None:
                    yield self._error(st, "no healthy decode instance to continue the request")
                    return
                inst, stream = picked, self._open_decode(st, picked, handle)
            client = inst.client
            try:
                async with aclosing(stream) as outs:
                    async for out in outs:
                        if out.finish_reason == "error" and failed_on is None:
                            failed_on = self._retry_once(inst.worker_id)
                            break
                        if out.finish_reason == "error":
                            yield self._poison(st, failed_on, inst.worker_id, out.error)
                            return
                        yield out
                        if out.finished:
                            return
                    else:
                        yield self._error(st, f"decode instance {inst.worker_id} ended the stream unfinished")
                        return
            except WorkerDeadError as e:
                self.decode.mark_dead(inst.worker_id, client, e)
            except InvalidRequestError:
                raise
            except RequestFailedError as e:
                yield self._error(st, f"decode failed: {e}")
                return
            finally:
                inst.num_inflight -= 1
            if handle is not None:  # the KV waiting on prefill will not be pulled now: recompute
                await self._abort_on(self.prefill, st)
                handle = None
        yield self._error(st, f"decode failed on {self.max_attempts} instances")

    def _retry_once(self, worker_id: str) -> str:
        self.num_retried += 1
        return worker_id

    def _poison(self, st: _State, first: str | None, second: str, error: str | None) -> StepOutput:
        self.num_poison += 1
        return self._error(st, f"the request failed twice (on {first}, then on {second}): {error}")

    async def _pick_decode(self, st: _State, avoid: str | None = None) -> Instance[DecodeClient] | None:
        deadline = self.clock() + self.failover_wait_s
        while (inst := self.decode.pick(st.request, avoid)) is None:
            if self.clock() >= deadline or not self.decode.instances:
                return None
            await asyncio.sleep(self.probe_interval_s)
            await self.decode.refresh(self.probe_interval_s * 5)
        return inst

    def _emit(self, st: _State, out: StepOutput) -> StepOutput:
        """Record an output; the workers' latency parts are folded into the breakdown on the last one."""
        now = self.clock()
        st.output_ids.extend(out.token_ids)
        if st.first_token_s is None and (out.token_ids or out.finished):
            st.first_token_s = now
        if out.latency is not None:
            st.latency += out.latency
        if not out.finished:
            return out if out.latency is None else dataclasses.replace(out, latency=None)
        st.finish_reason = out.finish_reason
        ttft = (st.first_token_s or now) - st.arrival_s
        return dataclasses.replace(out, latency=st.latency.finalize(ttft, now - st.arrival_s))

    def _error(self, st: _State, message: str) -> StepOutput:
        return StepOutput(st.request.request_id, (), finish_reason="error", error=message)

    async def _abort_on(self, pool: Pool[Any], st: _State) -> None:
        """Abort the request on every healthy instance of `pool` that was given it (dead ones freed it)."""
        ids = {w for p, w in st.holders if p is pool}
        insts = [pool.instances[w] for w in ids if w in pool.instances]
        targets = [(i.worker_id, i.client) for i in insts if i.healthy]
        results = await asyncio.gather(*(c.abort(st.request.request_id) for _, c in targets), return_exceptions=True)
        for (wid, client), r in zip(targets, results, strict=True):
            if isinstance(r, WorkerDeadError):
                pool.mark_dead(wid, client, r)

    async def _release(self, st: _State) -> None:
        if st.released:
            return
        st.released = True
        self.requests.pop(st.request.request_id, None)
        decoded_on = [w for p, w in st.holders if p is self.decode]
        if st.finish_reason in ("stop", "length") and decoded_on:  # it caches the outputs' KV (but the last token's)
            self.decode.remember(decoded_on[-1], (*st.request.prompt_token_ids, *st.output_ids[:-1]))
        if st.finish_reason not in ("stop", "length"):  # failed, client gone, timeout: free its blocks everywhere
            await asyncio.shield(asyncio.gather(self._abort_on(self.prefill, st),
                                                self._abort_on(self.decode, st)))
