"""A decode lane: one continuously batched micro-batch, advanced in closed form between events.

Between two changes of its batch (a join or a finish) a lane's iterations are deterministic: with
B requests and Σctx = S at boundary i0 (time t0), iteration j takes a + b·(S + j·B) + c·B, so

  time of boundary i0 + k  =  t0 + k·(a + c·B + b·S) + b·B·k(k−1)/2

and the simulator only wakes a lane at its next finish, never once per token. Iteration indices
are absolute; a request joined at boundary i with context ctx has context `ctx_off + i'` at any
later boundary i' (ctx_off = ctx − i), which is how a leaving request's context is subtracted.
"""

from __future__ import annotations

import heapq
import math

from pdserve.placement.latency import InstanceLatency


class Lane:
    __slots__ = ("lat", "owner", "index", "t0", "i0", "num_reqs", "sum_ctx", "finishes", "version", "speed",
                 "_step", "_b")

    def __init__(self, lat: InstanceLatency, owner: int) -> None:
        self.lat = lat
        self.owner = owner  # index of the instance this lane belongs to
        self.index = 0  # position among the simulator's lanes
        self.t0 = 0.0
        self.i0 = 0
        self.num_reqs = 0
        self.sum_ctx = 0.0
        self.finishes: list[tuple[int, int]] = []  # heap of (finish boundary, request index)
        self.version = 0  # bumped whenever the scheduled wake-up becomes stale
        self.speed = 1.0  # every iteration takes `speed` × the model's time (a shared, busy host)
        self._recoef()

    def _recoef(self) -> None:
        c = self.lat.decode_coeffs(self.num_reqs)
        self._step = (c.a + c.c * self.num_reqs) * self.speed  # per-iteration time apart from the context term
        self._b = c.b * self.speed

    def set_speed(self, speed: float) -> None:
        """Iterations from the reference boundary on take `speed` × the model's time; call at a boundary."""
        self.speed = speed
        self._recoef()

    def time_at(self, i: int) -> float:
        k = i - self.i0
        return self.t0 + k * (self._step + self._b * self.sum_ctx) + self._b * self.num_reqs * k * (k - 1) * 0.5

    def boundary_at_or_after(self, now: float) -> int:
        if self.num_reqs == 0 or now <= self.t0:
            return self.i0
        x = self._step + self._b * self.sum_ctx
        q = self._b * self.num_reqs * 0.5
        d = now - self.t0
        k = math.ceil(d / x) if q <= 0 else math.ceil((math.sqrt((x - q) ** 2 + 4 * q * d) - (x - q)) / (2 * q))
        # the closed form can be off by one in floating point: make k the smallest with t(k) >= now
        # the closed form may be off by one in floating point; `time_at` is the ground truth (a
        # wake-up scheduled at time_at(i) must find boundary i again)
        i = self.i0 + k
        while i > self.i0 and self.time_at(i - 1) >= now:
            i -= 1
        while self.time_at(i) < now:
            i += 1
        return i

    def rebase(self, i: int) -> None:
        """Move the reference point to boundary i >= i0 (nothing joins or leaves in between)."""
        if i != self.i0:
            self.t0 = self.time_at(i)
            self.sum_ctx += self.num_reqs * (i - self.i0)
            self.i0 = i

    def add(self, rid: int, ctx: int, num_iters: int) -> int:
        """Join at the current reference boundary; returns ctx_off for `remove`."""
        if self.num_reqs == 0 and self.finishes:
            raise AssertionError("lane: empty batch with pending finishes")
        self.num_reqs += 1
        self.sum_ctx += ctx
        heapq.heappush(self.finishes, (self.i0 + num_iters, rid))
        self._recoef()
        return ctx - self.i0

    def remove(self, ctx_off: int) -> None:
        """Leave at the current reference boundary (after `rebase` to its finish boundary)."""
        self.num_reqs -= 1
        self.sum_ctx -= ctx_off + self.i0
        self._recoef()

    def next_finish_time(self) -> float | None:
        return self.time_at(self.finishes[0][0]) if self.finishes else None

    def insert_gap(self, until: float) -> None:
        """Stall the batch until `until` (a colocated prefill runs in between); call at a boundary."""
        self.t0 = max(self.t0, until)

    def mixed_step_s(self, x1: float, x2: float) -> float:
        """Model time of one iteration carrying the batch's decodes plus `x1` prompt tokens with
        attention term `x2` (chunked prefill), at speed 1."""
        prof = self.lat.profile
        if self.num_reqs:
            return prof.decode_s(self.sum_ctx, self.num_reqs) + prof.prefill_extra_s(self.num_reqs, x1, x2)
        return prof.prefill_s(x1, x2)

    def custom_step(self, duration_s: float) -> None:
        """Run the next iteration with a given duration (a chunked-prefill iteration that also
        carries prefill tokens); call at a boundary."""
        self.sum_ctx += self.num_reqs
        self.i0 += 1
        self.t0 += duration_s
