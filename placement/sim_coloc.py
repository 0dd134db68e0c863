"""The colocated simulation: one engine per instance does both phases (pp must be 1).

A request goes to the instance `pick()` names (here the least work; trace.py's `RouterDispatch`
asks the router's policy instead). Prefill-priority stalls the decode batch for each prefill batch
(vLLM); chunked mixes up to `chunk_size` tokens of prefill with the decodes (Sarathi).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pdserve.placement.lane import Lane
from pdserve.placement.sim_core import DecodeEngine, Simulation
from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.workload import Trace

WAKE = 0


class ColocatedSim(Simulation):
    lane_role = "c"

    def __init__(self, dep: SimDeployment, trace: Trace, rate: float) -> None:
        super().__init__(dep, trace, rate)
        self.engines = [DecodeEngine(lat, self.new_lanes(lat, i, 1)) for i, lat in enumerate(dep.prefill)]
        self.outstanding = [0] * len(self.engines)  # prompt tokens not yet prefilled, per instance
        self.prefilled = [0] * len(trace)  # chunked prefill progress

    def handlers(self) -> Sequence[Callable[[object, object], None]]:
        return (self.on_wake,)

    def on_speed_change(self, lane: Lane) -> None:
        self.schedule(lane.owner)

    def pick(self) -> int:
        """The instance for the arriving request: the least work, prompt tokens not yet prefilled
        plus KV reserved by running requests (prompt tokens alone send every request to instance 0
        at light load, skewing the decode batches)."""
        engines, outstanding = self.engines, self.outstanding
        return 0 if len(engines) == 1 else min(range(len(engines)), key=lambda k: outstanding[k] + engines[k].reserved)

    def on_arrival(self, r: int) -> None:
        ci = self.pick()
        if self.plen[r] + self.olen[r] > self.dep.decode_capacity(self.engines[ci].lat):
            return  # can never run here: unserved (inf)
        self.engines[ci].waiting.append(r)
        self.outstanding[ci] += self.plen[r]
        self.schedule(ci)

    def can_admit(self, inst: DecodeEngine) -> bool:
        if not inst.waiting:
            return False
        r = inst.waiting[0]
        if self.prefilled[r]:
            return True  # already admitted: its chunks continue (prefilled counts cached tokens too)
        need = self.plen[r] + self.olen[r]
        return inst.reserved + need <= self.dep.decode_capacity(inst.lat) and inst.running < self.dep.max_num_seqs

    def schedule(self, ci: int) -> None:
        inst = self.engines[ci]
        lane = inst.lanes[0]
        lane.version += 1
        if self.can_admit(inst):
            t = lane.time_at(lane.boundary_at_or_after(self.now)) if lane.num_reqs else max(lane.t0, self.now)
        else:
            t = lane.next_finish_time()
        if t is not None:
            self.push(t, WAKE, ci, lane.version)

    def on_wake(self, ci: int, version: int) -> None:
        inst = self.engines[ci]
        lane = inst.lanes[0]
        if version != lane.version:
            return
        self.sync(lane)
        if self.can_admit(inst):
            if self.dep.colocated_policy == "chunked":
                self.chunk_step(ci, inst, lane)
            else:
                self.prefill_step(ci, inst, lane)
        self.schedule(ci)

    def admit_one(self, inst: DecodeEngine, r: int) -> None:
        inst.reserved += self.plen[r] + self.olen[r]
        inst.running += 1

    def first_token(self, ci: int, inst: DecodeEngine, lane: Lane, r: int, t: float) -> None:
        self.first_tok[r] = t
        self.outstanding[ci] -= self.plen[r]
        if self.olen[r] == 1:
            self.tpot[r] = 0.0
            inst.reserved -= self.plen[r] + 1
            inst.running -= 1
            if self.on_finish is not None:
                self.on_finish(r, t)
        else:
            self.ctx_off[r] = lane.add(r, self.plen[r] + 1, self.olen[r] - 1)

    def prefill_step(self, ci: int, inst: DecodeEngine, lane: Lane) -> None:
        """Prefill-priority: one FCFS batch under the token budget; the decode batch waits."""
        batch: list[int] = []
        s = s2 = 0
        while self.can_admit(inst):
            r = inst.waiting[0]
            p, c = self.plen[r], self.cached[r]  # p − c new tokens on c cached ones
            if batch and s + p - c > self.dep.prefill_token_budget:
                break
            inst.waiting.popleft()
            self.admit_one(inst, r)
            batch.append(r)
            s += p - c
            s2 += (p - c) * (p + c)
        end = lane.t0 + inst.lat.prefill_s(s, s2) * self.host_speed(("c", ci))
        lane.insert_gap(end)
        for r in batch:
            self.first_token(ci, inst, lane, r, end)

    def chunk_step(self, ci: int, inst: DecodeEngine, lane: Lane) -> None:
        """Chunked prefill: one iteration carrying the decodes plus up to chunk_size − B prompt tokens."""
        budget = self.dep.chunk_size - lane.num_reqs
        x1 = x2 = 0
        done: list[int] = []
        while budget > 0 and self.can_admit(inst):
            r = inst.waiting[0]
            d = self.prefilled[r]
            if d == 0:
                self.admit_one(inst, r)
                d = self.cached[r]  # a prefix-cache hit: those tokens are not computed again
            s = min(budget, self.plen[r] - d)
            x1 += s
            x2 += s * (2 * d + s)
            budget -= s
            self.prefilled[r] = d + s
            if d + s == self.plen[r]:
                done.append(inst.waiting.popleft())
        lane.custom_step(lane.mixed_step_s(x1, x2) * self.host_speed(("c", ci)))
        for r in done:
            self.first_token(ci, inst, lane, r, lane.t0)
