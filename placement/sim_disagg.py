"""The disaggregated simulation (DistServe's model).

Arrival → the prefill instance with the fewest outstanding prompt tokens → FCFS batches under a
token budget, admitted only while the KV they produce fits next to the KV not yet pulled
(back-pressure) → first token (TTFT) → the decode instance with the least reserved + waiting KV →
pulled when it can reserve prompt+output tokens and a slot, over its link (FIFO) → joins the
least-loaded lane (one per pipeline stage) → continuous batching → finish (TPOT).
`phases="prefill"` / `"decode"` simulates one phase alone (DistServe's Algorithm 1).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from pdserve.placement.lane import Lane
from pdserve.placement.latency import InstanceLatency
from pdserve.placement.sim_core import DecodeEngine, Instance, Simulation
from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.workload import Trace

STAGE_FREE, PREFILL_DONE, XFER_DONE, LANE_WAKE = range(4)


class PrefillInstance:
    """Its FCFS queue, outstanding prompt tokens (the dispatch key), KV tokens held until pulled,
    and whether its first pipeline stage is busy."""

    __slots__ = ("lat", "queue", "outstanding", "held", "busy")

    def __init__(self, lat: InstanceLatency) -> None:
        self.lat, self.queue, self.outstanding, self.held, self.busy = lat, deque(), 0, 0, False


class DisaggregatedSim(Simulation):
    lane_role = "d"

    def __init__(self, dep: SimDeployment, trace: Trace, rate: float) -> None:
        super().__init__(dep, trace, rate)
        self.src = [0] * len(trace)  # prefill instance of each request
        self.prefills = [PrefillInstance(lat) for lat in dep.prefill]
        self.engines = [DecodeEngine(lat, self.new_lanes(lat, i, lat.pp)) for i, lat in enumerate(dep.decode)]

    def handlers(self) -> Sequence[Callable[[object, object], None]]:
        return (self.on_stage_free, self.on_prefill_done, self.on_xfer_done, self.on_lane_wake)

    def busy_others(self) -> set[Instance]:
        return {("p", i) for i, pre in enumerate(self.prefills) if pre.busy}

    def on_speed_change(self, lane: Lane) -> None:
        self.schedule_wake(lane)
        self.admit(lane.owner)

    # ---- prefill side ----------------------------------------------------------------------------
    def on_arrival(self, r: int) -> None:
        if self.dep.phases == "decode":
            self.first_tok[r] = self.now
            if self.olen[r] == 1:  # the prefill produced its only token: nothing to decode
                self.tpot[r] = 0.0
            else:
                self.to_decode(r)
            return
        pi = 0 if len(self.prefills) == 1 else self.pick_prefill()
        pre = self.prefills[pi]
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
        budget, cap, plen, queue, cached = self.dep.prefill_token_budget, pre.lat.kv_capacity_tokens, self.plen, pre.queue, self.cached
        batch: list[int] = []
        s = s2 = 0
        while queue:
            r = queue[0]
            p, c = plen[r], cached[r]  # computes p − c new tokens on c cached ones
            if (batch and s + p - c > budget) or pre.held + p > cap:
                break
            batch.append(queue.popleft())
            s += p - c
            s2 += (p - c) * (p + c)
            pre.held += p
        if not batch:
            return  # back-pressure: retried when a transfer frees prefill memory
        stage = pre.lat.prefill_stage_s(s, s2) * self.host_speed(("p", pi))
        pre.busy = True
        if pre.lat.pp > 1:
            self.push(self.now + stage, STAGE_FREE, pi)
        self.push(self.now + pre.lat.pp * stage, PREFILL_DONE, pi, batch)

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
                if self.on_finish is not None:
                    self.on_finish(r, now)
            else:
                self.to_decode(r)
        if pre.lat.pp == 1:
            pre.busy = False
        self.try_prefill(pi)

    def release_prefill(self, r: int) -> None:
        if self.dep.phases == "decode":
            return
        pi = self.src[r]
        self.prefills[pi].held -= self.plen[r]
        self.try_prefill(pi)

    # ---- decode side -------------------------------------------------------------------------------
    def pick_prefill(self) -> int:
        """The prefill instance for an arriving request: the fewest outstanding prompt tokens."""
        prefills = self.prefills
        return min(range(len(prefills)), key=lambda k: prefills[k].outstanding)

    def pick_decode(self) -> int:
        """The decode instance for a prefilled request: the least KV reserved and waiting."""
        decodes = self.engines
        return min(range(len(decodes)), key=lambda k: decodes[k].reserved + decodes[k].waiting_tokens)

    def to_decode(self, r: int) -> None:
        di = 0 if len(self.engines) == 1 else self.pick_decode()
        dec = self.engines[di]
        dec.waiting.append(r)
        dec.waiting_tokens += self.plen[r] + self.olen[r]
        self.admit(di)

    def admit(self, di: int) -> None:
        dec, plen, olen = self.engines[di], self.plen, self.olen
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
            dec.link_free = start + transfer.transfer_s(self.pull_tokens(r, di))
            self.push(dec.link_free, XFER_DONE, r, di)

    def pull_tokens(self, r: int, di: int) -> int:
        """KV tokens request `r`'s pull to decode instance `di` moves: its whole prompt here (only what
        `di` lacks with a prefix cache, sim_reuse.py)."""
        return self.plen[r]

    def next_boundary(self, dec: DecodeEngine) -> float:
        """When the instance's running iteration ends (now, if it is idle)."""
        lane = min(dec.lanes, key=lambda ln: ln.num_reqs)
        if lane.num_reqs == 0:
            return self.now
        self.sync(lane)
        return lane.time_at(lane.i0)

    def on_xfer_done(self, r: int, di: int) -> None:
        self.release_prefill(r)
        lanes = self.engines[di].lanes
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
            self.push(t, LANE_WAKE, lane.index, lane.version)
