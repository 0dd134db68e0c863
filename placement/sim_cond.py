"""The disaggregated simulation with reuse: prefix caches on both sides, delta pulls, the router's
cache-aware dispatch, and conditional disaggregation by the router's own `PDRule`.

At arrival the decode instance is chosen first (router/policies.py: `cache_aware_decode` with
`cache_aware`, else `least_kv_pressure`), because what it caches decides the rest. Then
`pd_decision.PDRule.decide` — the router's function, called here, not a copy — gets the prompt
tokens that instance lacks, the least prompt work queued on a prefill instance, and the instance's
slack from the router's own `conditional.decode_slack_tokens` (the chunk size less the requests it
holds and the local prompt work already queued; 0 without a free slot or KV for the prompt). Remote: the prefill instance (`cache_aware_prefill` or
`least_outstanding_tokens`) computes what it lacks, then the decode instance pulls only the KV
it lacks (delta). Local: the decode instance prefills the uncached part itself, in chunks of its
iterations (Sarathi-style, next to its running decodes), and the request joins its batch.
Local prefills need decode pp == 1 (`SimDeployment` checks).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from pdserve.placement.lane import Lane
from pdserve.placement.prefix_model import PrefixCacheModel
from pdserve.placement.sim_core import DecodeEngine
from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.sim_disagg import LANE_WAKE
from pdserve.placement.sim_reuse import SessionReuse, request_for, with_hit
from pdserve.placement.trace import DisaggregatedRouterDispatch, router_view
from pdserve.placement.workload import Trace
from pdserve.router import conditional, pd_decision, policies


class ReuseDisaggregatedSim(SessionReuse, DisaggregatedRouterDispatch):
    def __init__(self, dep: SimDeployment, trace: Trace, rate: float) -> None:
        super().__init__(dep, trace, rate)
        self.setup_reuse(trace, [dep.decode_capacity(e.lat) for e in self.engines])
        # the KV pool of every engine is capped alike (decode_token_limit: one kv_cache_memory_gb for all)
        self.pcaches = [PrefixCacheModel(dep.decode_capacity(p.lat)) for p in self.prefills] if dep.prefix_caching else None
        self.rule = pd_decision.PDRule(dep.pd_threshold_tokens, dep.pd_prefill_queue_limit)
        self.local: list[deque[int]] = [deque() for _ in self.engines]
        self.local_left = [0] * len(self.engines)  # local prompt tokens not yet computed, per decode instance
        self.prefilled = [0] * len(trace)  # local prefill progress (cached tokens included)
        self.arriving = 0
        self.decisions: dict[str, int] = {}  # PDDecision.reason -> count
        cache_aware = dep.cache_aware and dep.prefix_caching
        self.prefill_policy = policies.cache_aware_prefill if cache_aware else policies.least_outstanding_tokens
        self.decode_policy = policies.cache_aware_decode if cache_aware else policies.least_kv_pressure

    def handlers(self) -> Sequence[Callable[[object, object], None]]:
        return (*super().handlers(), self.on_turn)

    # ---- dispatch ----------------------------------------------------------------------------------
    def on_arrival(self, r: int) -> None:
        if self.dep.phases != "both":
            super().on_arrival(r)
            return
        self.arriving = r
        di = self.pick_decode()
        self.home[r] = di
        hit_d = self.hit(self.caches[di] if self.caches else None, r)
        st = self.stats
        st.prompt_tokens += self.plen[r]
        queued = min(p.outstanding for p in self.prefills)
        d = self.rule.decide(self.plen[r] - hit_d, queued, self.slack(di, self.plen[r] - hit_d))
        self.decisions[d.reason] = self.decisions.get(d.reason, 0) + 1
        if d.local:
            st.num_local += 1
            st.prefill_hit_tokens += hit_d
            st.decode_hit_tokens += hit_d
            self.cached[r] = hit_d
            self.local[di].append(r)
            self.local_left[di] += self.plen[r] - hit_d
            self.schedule_wake(self.engines[di].lanes[0])
            return
        st.num_remote += 1
        if len(self.prefills) == 1:
            self.cached[r] = self.hit(self.pcaches[0] if self.pcaches else None, r)
            st.prefill_hit_tokens += self.cached[r]
        super().on_arrival(r)

    def pick_prefill(self) -> int:
        r, caches = self.arriving, self.pcaches
        hits = [self.hit(caches[i] if caches else None, r) for i in range(len(self.prefills))]
        stats = [router_view(i, 0, len(p.queue), 0, 1, p.outstanding, hits[i]) for i, p in enumerate(self.prefills)]
        pi = int(self.prefill_policy(request_for(self.plen[r]), stats, self._tick(0)))
        self.cached[r] = hits[pi]
        self.stats.prefill_hit_tokens += hits[pi]
        return pi

    def pick_decode(self) -> int:
        r, caches = self.arriving, self.caches
        stats = [router_view(i, dec.running, len(dec.waiting) + len(self.local[i]), dec.reserved,
                             self.dep.decode_capacity(dec.lat)) for i, dec in enumerate(self.engines)]
        if caches:
            stats = [with_hit(s, self.hit(caches[i], r)) for i, s in enumerate(stats)]
        return int(self.decode_policy(request_for(self.plen[r]), stats, self._tick(1)))

    def slack(self, di: int, uncached: int) -> int:
        """The router's `decode_slack_tokens` of `di`, on what the router would see of it: KV in
        blocks of one token, the chunk as its token budget, local prompt tokens still to compute as
        its outstanding tokens."""
        dec, waiting = self.engines[di], sum(1 for r in self.local[di] if not self.prefilled[r])
        cap = self.dep.decode_capacity(dec.lat)
        stats = replace(router_view(di, dec.running, len(dec.waiting) + waiting, dec.reserved, cap, self.local_left[di]),
                        max_num_seqs=self.dep.max_num_seqs, max_num_batched_tokens=self.dep.chunk_size, block_size=1)
        return conditional.decode_slack_tokens(stats, uncached)

    # ---- remote path: prefill instance, then a delta pull ------------------------------------------
    def on_prefill_done(self, pi: int, batch: list[int]) -> None:
        super().on_prefill_done(pi, batch)
        if self.pcaches is not None:
            cache, held = self.pcaches[pi], self.prefills[pi].held
            for r in batch:
                cache.insert(self.sid[r], self.plen[r], self.shared[r], held)

    def to_decode(self, r: int) -> None:
        di = self.home[r]
        dec = self.engines[di]
        dec.waiting.append(r)
        dec.waiting_tokens += self.plen[r] + self.olen[r]
        self.admit(di)

    def pull_tokens(self, r: int, di: int) -> int:
        held = self.hit(self.caches[di] if self.caches else None, r)
        self.stats.decode_hit_tokens += held
        self.stats.pulled_tokens += self.plen[r] - held
        return self.plen[r] - held

    # ---- local path: chunks inside the decode instance's iterations ---------------------------------
    def can_start_local(self, di: int) -> bool:
        q, dec = self.local[di], self.engines[di]
        if not q:
            return False
        r = q[0]
        if self.prefilled[r]:
            return True
        need = self.plen[r] + self.olen[r]
        return dec.reserved + need <= self.dep.decode_capacity(dec.lat) and dec.running < self.dep.max_num_seqs

    def schedule_wake(self, lane: Lane) -> None:
        if not self.can_start_local(lane.owner):
            super().schedule_wake(lane)
            return
        lane.version += 1
        t = lane.time_at(lane.boundary_at_or_after(self.now)) if lane.num_reqs else max(lane.t0, self.now)
        self.push(t, LANE_WAKE, lane.index, lane.version)

    def on_lane_wake(self, lane_idx: int, version: int) -> None:
        lane = self.lanes[lane_idx]
        if version != lane.version:
            return
        self.sync(lane)
        if self.can_start_local(lane.owner):
            self.local_step(lane.owner, self.engines[lane.owner], lane)
        self.schedule_wake(lane)
        self.admit(lane.owner)

    def local_step(self, di: int, dec: DecodeEngine, lane: Lane) -> None:
        """One iteration: the running decodes plus up to chunk_size − B local prompt tokens."""
        budget, q, plen = self.dep.chunk_size - lane.num_reqs, self.local[di], self.plen
        x1 = x2 = 0
        done: list[int] = []
        while budget > 0 and self.can_start_local(di):
            r = q[0]
            d = self.prefilled[r]
            if d == 0:
                dec.reserved += plen[r] + self.olen[r]
                dec.running += 1
                d = self.cached[r]
            s = min(budget, plen[r] - d)
            x1, x2, budget = x1 + s, x2 + s * (2 * d + s), budget - s
            self.prefilled[r] = d + s
            self.local_left[di] -= s
            if d + s == plen[r]:
                done.append(q.popleft())
        lane.custom_step(lane.mixed_step_s(x1, x2) * self.host_speed(("d", di)))
        for r in done:
            self.first_tok[r] = lane.t0
            if self.olen[r] == 1:
                self.tpot[r] = 0.0
                dec.reserved -= plen[r] + 1
                dec.running -= 1
                self.finished(r, lane.t0)
            else:
                self.ctx_off[r] = lane.add(r, plen[r] + 1, self.olen[r] - 1)
