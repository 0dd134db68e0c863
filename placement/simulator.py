"""Discrete-event simulator of one deployment serving one trace at one rate (Vidur's shape: a heap
of timed events, each handled by a method that may schedule more).

Disaggregated: arrival → the prefill instance with the fewest outstanding prompt tokens → FCFS
batches under a token budget, admitted only while the KV they produce fits next to the KV not yet
pulled (back-pressure) → first token (TTFT) → the decode instance with the least reserved KV →
pulled when it can reserve prompt+output tokens and a slot, over its link (FIFO) → joins the
least-loaded lane (one per pipeline stage) → continuous batching → finish (TPOT).
Colocated: one engine per instance (a request goes to the least loaded); prefill-priority stalls the decode batch for each prefill
batch (vLLM), chunked mixes up to `chunk_size` tokens of prefill with the decodes (Sarathi).
With `host_slowdown` (instances sharing one host), a step that starts while another instance is
busy runs that much slower: a prefill batch from its start, a decode lane from its next boundary
after any instance's state changes.
Deterministic: same deployment, trace and rate → same result.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque

from pdserve.placement.deployment import Deployment, SimResult
from pdserve.placement.lane import Lane
from pdserve.placement.latency import InstanceLatency
from pdserve.placement.workload import Trace

_INF = float("inf")
_STAGE_FREE, _PREFILL_DONE, _XFER_DONE, _LANE_WAKE, _COLOC_WAKE = range(5)


def simulate(dep: Deployment, trace: Trace, rate: float) -> SimResult:
    return _Sim(dep, trace, rate).run()


class _Prefill:
    __slots__ = ("lat", "queue", "outstanding", "held", "busy")

    def __init__(self, lat: InstanceLatency) -> None:
        self.lat, self.queue, self.outstanding, self.held, self.busy = lat, deque(), 0, 0, False


class _Decode:
    __slots__ = ("lat", "lanes", "reserved", "running", "waiting", "waiting_tokens", "link_free")

    def __init__(self, lat: InstanceLatency, lanes: list[Lane]) -> None:
        self.lat, self.lanes = lat, lanes
        self.reserved = self.running = self.waiting_tokens = 0
        self.waiting: deque[int] = deque()
        self.link_free = 0.0


class _Sim:
    def __init__(self, dep: Deployment, trace: Trace, rate: float) -> None:
        self.dep = dep
        self.arrival = trace.arrivals(rate)
        self.plen, self.olen = trace.prompt_lens, trace.output_lens
        n = len(trace)
        self.first_tok = [_INF] * n
        self.tpot = [_INF] * n
        self.src = [0] * n  # prefill instance of each request
        self.ctx_off = [0] * n
        self.prefilled = [0] * n  # chunked prefill progress
        self.heap: list[tuple] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.lanes: list[Lane] = []
        self.decodes: list[_Decode] = []
        self.prefills: list[_Prefill] = []
        if dep.mode == "colocated":
            self.colocs = [_Decode(lat, self._new_lanes(lat, i, 1)) for i, lat in enumerate(dep.prefill)]
            self.outstanding = [0] * len(self.colocs)
        else:
            self.prefills = [_Prefill(lat) for lat in dep.prefill]
            self.decodes = [_Decode(lat, self._new_lanes(lat, i, lat.pp)) for i, lat in enumerate(dep.decode)]

    def _new_lanes(self, lat: InstanceLatency, owner: int, count: int) -> list[Lane]:
        lanes = [Lane(lat, owner) for _ in range(count)]
        for lane in lanes:
            lane.index = len(self.lanes)
            self.lanes.append(lane)
        return lanes

    def push(self, t: float, kind: int, a: object, b: object = None) -> None:
        heapq.heappush(self.heap, (t, next(self._seq), kind, a, b))

    def run(self) -> SimResult:
        arrival, heap, n, i = self.arrival, self.heap, len(self.arrival), 0
        on_arrival = self.on_coloc_arrival if self.dep.mode == "colocated" else self.on_arrival
        handlers = (self.on_stage_free, self.on_prefill_done, self.on_xfer_done, self.on_lane_wake,
                    self.on_coloc_wake)
        while i < n or heap:
            if i < n and (not heap or arrival[i] <= heap[0][0]):
                self.now = arrival[i]
                on_arrival(i)
                i += 1
            else:
                t, _, kind, a, b = heapq.heappop(heap)
                self.now = t
                handlers[kind](a, b)
            if self.dep.host_slowdown:
                self.update_speeds()
        ttft = tuple(f - a for f, a in zip(self.first_tok, arrival))
        return SimResult(ttft, tuple(self.tpot))

    # ---- disaggregated: prefill side -------------------------------------------------------
    def on_arrival(self, r: int) -> None:
        if self.dep.phases == "decode":
            self.first_tok[r] = self.now
            if self.olen[r] == 1:  # the prefill produced its only token: nothing to decode
                self.tpot[r] = 0.0
            else:
                self.to_decode(r)
            return
        prefills = self.prefills
        pi = 0 if len(prefills) == 1 else min(range(len(prefills)), key=lambda k: prefills[k].outstanding)
        pre = prefills[pi]
        if self.plen[r] > pre.lat.kv_capacity_tokens:
            return  # can never be prefilled here: stays unserved (inf)
        self.src[r] = pi
        pre.queue.append(r)
        pre.outstanding += self.plen[r]
        self.try_prefill(pi)

    def try_prefill(self, pi: int) -> None:
        pre = self.prefills[pi]
        if pre.busy or not pre.queue:
            return
        budget, cap, plen, queue = self.dep.prefill_token_budget, pre.lat.kv_capacity_tokens, self.plen, pre.queue
        batch: list[int] = []
        s = s2 = 0
        while queue:
            p = plen[queue[0]]
            if (batch and s + p > budget) or pre.held + p > cap:
                break
            batch.append(queue.popleft())
            s += p
            s2 += p * p
            pre.held += p
        if not batch:
            return  # back-pressure: retried when a transfer frees prefill memory
        stage = pre.lat.prefill_stage_s(s, s2) * self.host_speed(("p", pi))
        pre.busy = True
        if pre.lat.pp > 1:
            self.push(self.now + stage, _STAGE_FREE, pi)
        self.push(self.now + pre.lat.pp * stage, _PREFILL_DONE, pi, batch)

    def on_stage_free(self, pi: int, _: object) -> None:
        self.prefills[pi].busy = False
        self.try_prefill(pi)

    def on_prefill_done(self, pi: int, batch: list[int]) -> None:
        pre, now = self.prefills[pi], self.now
        for r in batch:
            self.first_tok[r] = now
            pre.outstanding -= self.plen[r]
            if self.dep.phases == "prefill" or self.olen[r] == 1:
                pre.held -= self.plen[r]
                self.tpot[r] = 0.0
            else:
                self.to_decode(r)
        if pre.lat.pp == 1:
            pre.busy = False
        self.try_prefill(pi)

    # ---- a shared host ---------------------------------------------------------------------
    def busy_instances(self) -> set[tuple[str, int]]:
        """Instances computing now: prefill instances in a batch; decode and colocated instances
        with a running batch or in a step that carries no decodes (a prefill or a chunk)."""
        now = self.now
        busy = {("p", i) for i, pre in enumerate(self.prefills) if pre.busy}
        for lane in self.lanes:
            if lane.num_reqs or lane.t0 > now:
                busy.add(("c" if self.dep.mode == "colocated" else "d", lane.owner))
        return busy

    def host_speed(self, me: tuple[str, int]) -> float:
        """How much longer a step of instance `me` starting now takes (1 unless the host is shared)."""
        if not self.dep.host_slowdown:
            return 1.0
        return 1.0 + self.dep.host_slowdown if self.busy_instances() - {me} else 1.0

    def update_speeds(self) -> None:
        """After an event: lanes whose neighbours' busy state changed switch speed at their next boundary."""
        kind = "c" if self.dep.mode == "colocated" else "d"
        for lane in self.lanes:
            speed = self.host_speed((kind, lane.owner))
            if speed == lane.speed:
                continue
            self.sync(lane)
            lane.set_speed(speed)
            if self.dep.mode == "colocated":
                self.coloc_schedule(lane.owner)
            else:
                self.schedule_wake(lane)
                self.admit(lane.owner)

    # ---- disaggregated: decode side --------------------------------------------------------
    def to_decode(self, r: int) -> None:
        decodes = self.decodes
        di = 0 if len(decodes) == 1 else min(
            range(len(decodes)), key=lambda k: decodes[k].reserved + decodes[k].waiting_tokens)
        dec = decodes[di]
        dec.waiting.append(r)
        dec.waiting_tokens += self.plen[r] + self.olen[r]
        self.admit(di)

    def admit(self, di: int) -> None:
        dec, plen, olen = self.decodes[di], self.plen, self.olen
        cap, transfer = self.dep.decode_capacity(dec.lat), self.dep.transfer
        while dec.waiting:
            r = dec.waiting[0]
            need = plen[r] + olen[r]
            if need > cap:  # can never run here: unserved, release its prefill KV
                dec.waiting.popleft()
                dec.waiting_tokens -= need
                self.release_prefill(r)
                continue
            if dec.reserved + need > cap or dec.running >= self.dep.max_num_seqs:
                return
            dec.waiting.popleft()
            dec.waiting_tokens -= need
            dec.reserved += need
            dec.running += 1
            start = max(self.now, dec.link_free, self.next_boundary(dec) if self.dep.pull_at_step_boundary else 0.0)
            dec.link_free = start + transfer.transfer_s(plen[r])
            self.push(dec.link_free, _XFER_DONE, r, di)

    def next_boundary(self, dec: _Decode) -> float:
        """When the instance's running iteration ends (now, if it is idle)."""
        lane = min(dec.lanes, key=lambda ln: ln.num_reqs)
        if lane.num_reqs == 0:
            return self.now
        self.sync(lane)
        return lane.time_at(lane.i0)

    def release_prefill(self, r: int) -> None:
        if self.dep.phases == "decode":
            return
        pi = self.src[r]
        self.prefills[pi].held -= self.plen[r]
        self.try_prefill(pi)

    def on_xfer_done(self, r: int, di: int) -> None:
        self.release_prefill(r)
        dec = self.decodes[di]
        lanes = dec.lanes
        lane = lanes[0] if len(lanes) == 1 else min(lanes, key=lambda ln: ln.num_reqs)
        freed = self.sync(lane)
        self.ctx_off[r] = lane.add(r, self.plen[r] + 1, self.olen[r] - 1)
        self.schedule_wake(lane)
        if freed:
            self.admit(di)

    def on_lane_wake(self, lane_idx: int, version: int) -> None:
        lane = self.lanes[lane_idx]
        if version != lane.version:
            return
        self.sync(lane)
        self.schedule_wake(lane)
        self.admit(lane.owner)

    def schedule_wake(self, lane: Lane) -> None:
        lane.version += 1
        t = lane.next_finish_time()
        if t is not None:
            self.push(t, _LANE_WAKE, lane.index, lane.version)

    def sync(self, lane: Lane) -> bool:
        """Retire every request finishing at or before now; move the lane to the first
        boundary >= now. Returns whether memory was freed."""
        now, finishes, freed = self.now, lane.finishes, False
        owner = (self.colocs if self.dep.mode == "colocated" else self.decodes)[lane.owner]
        while finishes:
            fi = finishes[0][0]
            t = lane.time_at(fi)
            if t > now:
                break
            lane.rebase(fi)
            while finishes and finishes[0][0] == fi:
                r = heapq.heappop(finishes)[1]
                lane.remove(self.ctx_off[r])
                self.tpot[r] = (t - self.first_tok[r]) / (self.olen[r] - 1)
                owner.reserved -= self.plen[r] + self.olen[r]
                owner.running -= 1
                freed = True
        if lane.num_reqs == 0:
            lane.t0 = max(lane.t0, now)
        else:
            lane.rebase(lane.boundary_at_or_after(now))
        return freed

    # ---- colocated -------------------------------------------------------------------------
    def on_coloc_arrival(self, r: int) -> None:
        colocs, outstanding = self.colocs, self.outstanding
        # least work: prompt tokens not yet prefilled plus KV reserved by running requests (prompt
        # tokens alone send every request to instance 0 at light load, skewing the decode batches)
        ci = 0 if len(colocs) == 1 else min(range(len(colocs)), key=lambda k: outstanding[k] + colocs[k].reserved)
        if self.plen[r] + self.olen[r] > self.dep.decode_capacity(colocs[ci].lat):
            return
        self.colocs[ci].waiting.append(r)
        self.outstanding[ci] += self.plen[r]
        self.coloc_schedule(ci)

    def coloc_can_admit(self, inst: _Decode) -> bool:
        if not inst.waiting:
            return False
        r = inst.waiting[0]
        if self.prefilled[r]:
            return True  # already admitted: its chunks continue
        need = self.plen[r] + self.olen[r]
        return inst.reserved + need <= self.dep.decode_capacity(inst.lat) and inst.running < self.dep.max_num_seqs

    def coloc_schedule(self, ci: int) -> None:
        inst = self.colocs[ci]
        lane = inst.lanes[0]
        lane.version += 1
        if self.coloc_can_admit(inst):
            t = lane.time_at(lane.boundary_at_or_after(self.now)) if lane.num_reqs else max(lane.t0, self.now)
        else:
            t = lane.next_finish_time()
        if t is not None:
            self.push(t, _COLOC_WAKE, ci, lane.version)

    def on_coloc_wake(self, ci: int, version: int) -> None:
        inst = self.colocs[ci]
        lane = inst.lanes[0]
        if version != lane.version:
            return
        self.sync(lane)
        if self.coloc_can_admit(inst):
            if self.dep.colocated_policy == "chunked":
                self.coloc_chunk(ci, inst, lane)
            else:
                self.coloc_prefill(ci, inst, lane)
        self.coloc_schedule(ci)

    def coloc_admit_one(self, ci: int, inst: _Decode, r: int) -> None:
        inst.reserved += self.plen[r] + self.olen[r]
        inst.running += 1

    def coloc_first_token(self, ci: int, inst: _Decode, lane: Lane, r: int, t: float) -> None:
        self.first_tok[r] = t
        self.outstanding[ci] -= self.plen[r]
        if self.olen[r] == 1:
            self.tpot[r] = 0.0
            inst.reserved -= self.plen[r] + 1
            inst.running -= 1
        else:
            self.ctx_off[r] = lane.add(r, self.plen[r] + 1, self.olen[r] - 1)

    def coloc_prefill(self, ci: int, inst: _Decode, lane: Lane) -> None:
        """Prefill-priority: one FCFS batch under the token budget; the decode batch waits."""
        batch: list[int] = []
        s = s2 = 0
        while self.coloc_can_admit(inst):
            p = self.plen[inst.waiting[0]]
            if batch and s + p > self.dep.prefill_token_budget:
                break
            r = inst.waiting.popleft()
            self.coloc_admit_one(ci, inst, r)
            batch.append(r)
            s += p
            s2 += p * p
        end = lane.t0 + inst.lat.prefill_s(s, s2) * self.host_speed(("c", ci))
        lane.insert_gap(end)
        for r in batch:
            self.coloc_first_token(ci, inst, lane, r, end)

    def coloc_chunk(self, ci: int, inst: _Decode, lane: Lane) -> None:
        """Chunked prefill: one iteration carrying the decodes plus up to chunk_size − B prompt tokens."""
        budget = self.dep.chunk_size - lane.num_reqs
        x1 = x2 = 0
        done: list[int] = []
        while budget > 0 and self.coloc_can_admit(inst):
            r = inst.waiting[0]
            d = self.prefilled[r]
            if d == 0:
                self.coloc_admit_one(ci, inst, r)
            s = min(budget, self.plen[r] - d)
            x1 += s
            x2 += s * (2 * d + s)
            budget -= s
            self.prefilled[r] = d + s
            if d + s == self.plen[r]:
                done.append(inst.waiting.popleft())
        prof = inst.lat.profile
        if lane.num_reqs:
            dt = prof.decode_s(lane.sum_ctx, lane.num_reqs) + prof.prefill_extra_s(lane.num_reqs, x1, x2)
        else:
            dt = prof.prefill_s(x1, x2)
        lane.custom_step(dt * self.host_speed(("c", ci)))
        for r in done:
            self.coloc_first_token(ci, inst, lane, r, lane.t0)
