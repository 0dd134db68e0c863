"""The latency model: per (model, GPU, TP) fitted coefficients (`PhaseProfile`), and per (TP, PP)
instance the stage times, KV capacity and the way decode iterations grow, which the simulator uses.

  prefill  T = a + b·Σl + c·Σl²    (l: prompt lengths in the batch)
  decode   T = a + b·Σctx + c·B    (B: batch size; `decode_small` up to the threshold, then `decode_large`)

A measured profile may also carry two curves that replace the linear terms where it has data
(DistServe's form assumes GPU kernels whose time is linear in the batch; a CPU's small-M GEMMs are
not: on this machine a decode step of 2 sequences costs 1.6× one of 1, and 3 costs more than 4):

  prefill  T = P(Σl) + c'·Σl²      (P: measured time at Σl tokens without the attention term)
  decode   T = D(B) + b'·Σctx      (D: measured time at batch B without the context term)

both piecewise linear between the measured points (`Curve`, which carries its own c' or b').

Times are seconds for the whole model on `tp` GPUs. A PP instance splits it into `pp` stages:
a prefill stage takes T/pp + `pp_stage_overhead_s`, a decode stage T/pp (DistServe's model).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

from pdserve.placement.hardware import GPUSpec
from pdserve.placement.model_spec import ModelSpec


@dataclass(frozen=True)
class Coeffs:
    a: float
    b: float
    c: float

    def __call__(self, x1: float, x2: float) -> float:
        return self.a + self.b * x1 + self.c * x2

    def scaled(self, k: float) -> Coeffs:
        return Coeffs(self.a * k, self.b * k, self.c * k)


@dataclass(frozen=True)
class Curve:
    """T = f(key) + slope·x, f piecewise linear through measured points (xs strictly increasing),
    held flat before the first point and continued past the last along the last segment's slope
    (never downwards)."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    slope: float

    def __post_init__(self) -> None:
        if len(self.xs) != len(self.ys) or not self.xs or any(b <= a for a, b in zip(self.xs, self.xs[1:])):
            raise ValueError(f"curve: need matching, strictly increasing points, got xs={self.xs}")

    def __call__(self, key: float, x: float) -> float:
        return self.base(key) + self.slope * x

    def base(self, key: float) -> float:
        xs, ys = self.xs, self.ys
        if key <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, key)
        if i == len(xs):
            rise = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
            return ys[-1] + max(rise, 0.0) * (key - xs[-1])
        t = (key - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + t * (ys[i] - ys[i - 1])

    def shifted(self, dy: float) -> Curve:
        return Curve(self.xs, tuple(y + dy for y in self.ys), self.slope)

    def scaled(self, k: float) -> Curve:
        return Curve(self.xs, tuple(y * k for y in self.ys), self.slope * k)


@dataclass(frozen=True, kw_only=True)
class PhaseProfile:
    """Fitted full-model times (seconds) of one (model, GPU, TP). When present, `prefill_tokens`
    replaces the prefill form (continued past its last point) and `decode_batch` the decode form
    up to its largest measured batch."""

    prefill: Coeffs
    decode_small: Coeffs
    decode_large: Coeffs
    large_batch_threshold: int = 95
    prefill_tokens: Curve | None = None  # T(Σl, Σl²)
    decode_batch: Curve | None = None  # T(B, Σctx)

    def prefill_s(self, sum_len: float, sum_len_sq: float) -> float:
        if self.prefill_tokens is None:
            return self.prefill(sum_len, sum_len_sq)
        return self.prefill_tokens(sum_len, sum_len_sq)

    def prefill_extra_s(self, base_tokens: int, num_tokens: float, sum_sq: float) -> float:
        """What `num_tokens` prompt tokens (attention term `sum_sq`) add to a step that already
        carries `base_tokens` tokens: a chunked-prefill iteration riding on a decode batch."""
        if self.prefill_tokens is None:
            return self.prefill.b * num_tokens + self.prefill.c * sum_sq
        curve = self.prefill_tokens
        return max(0.0, curve.base(base_tokens + num_tokens) - curve.base(base_tokens)) + curve.slope * sum_sq

    def decode_coeffs(self, batch_size: int) -> Coeffs:
        """Per-iteration `a + b·Σctx + c·B` at this batch size (with a batch curve: a = D(B), c = 0)."""
        linear = self.decode_small if batch_size <= self.large_batch_threshold else self.decode_large
        if self.decode_batch is None or batch_size > self.decode_batch.xs[-1]:
            return linear
        return Coeffs(self.decode_batch.base(batch_size), self.decode_batch.slope, 0.0)

    def decode_s(self, sum_ctx: float, batch_size: int) -> float:
        return self.decode_coeffs(batch_size)(sum_ctx, batch_size)

    def scaled(self, k: float) -> PhaseProfile:
        """Every step k× as long (a slower or faster host)."""
        return PhaseProfile(prefill=self.prefill.scaled(k), decode_small=self.decode_small.scaled(k),
                            decode_large=self.decode_large.scaled(k), large_batch_threshold=self.large_batch_threshold,
                            prefill_tokens=self.prefill_tokens and self.prefill_tokens.scaled(k),
                            decode_batch=self.decode_batch and self.decode_batch.scaled(k))


class LatencySource(Protocol):
    """Where coefficients come from: a profile file (measured or published) or a roofline."""

    name: str

    def profile(self, model: ModelSpec, tp: int) -> PhaseProfile | None:
        """The fit for `model` on `tp` GPUs, or None when this source has nothing for that TP
        (the search then skips every candidate with that TP). Never raises for a missing TP."""
        ...


@dataclass(frozen=True, kw_only=True)
class InstanceLatency:
    """One TP×PP instance: what the simulator asks of the latency model."""

    tp: int
    pp: int
    profile: PhaseProfile
    kv_capacity_tokens: int
    pp_stage_overhead_s: float = 0.0

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

    def prefill_stage_s(self, sum_len: float, sum_len_sq: float) -> float:
        """Time one prefill batch occupies each pipeline stage (a new batch may enter after it)."""
        t = self.profile.prefill_s(sum_len, sum_len_sq)
        return t / self.pp + (self.pp_stage_overhead_s if self.pp > 1 else 0.0)

    def prefill_s(self, sum_len: float, sum_len_sq: float) -> float:
        """Latency of one prefill batch through every stage."""
        return self.pp * self.prefill_stage_s(sum_len, sum_len_sq)

    def decode_coeffs(self, batch_size: int) -> Coeffs:
        """Per-iteration time of one micro-batch through all stages. With PP, `pp` micro-batches
        are in flight at once (the simulator gives each its own lane), each passing all stages."""
        return self.profile.decode_coeffs(batch_size)


def activation_reserve_bytes(model: ModelSpec, gpu: GPUSpec, tp: int, max_batch_tokens: int = 4096,
                             max_num_seqs: int = 512) -> float:
    """Memory per GPU kept for activations: the larger of DistServe's rule (1% of memory) and one
    forward of `max_batch_tokens` tokens (`ModelSpec.activation_bytes`)."""
    return max(0.01 * gpu.mem_bytes, float(model.activation_bytes(tp, max_batch_tokens, max_num_seqs)))


def kv_capacity_tokens(model: ModelSpec, gpu: GPUSpec, tp: int, pp: int, mem_util: float = 0.95,
                       max_batch_tokens: int = 4096, max_num_seqs: int = 512) -> int:
    """KV tokens a TP×PP instance holds: `mem_util` of each GPU's memory minus its share of the
    weights and the activation reserve (DistServe: 0.95 and 1%); <= 0 means the weights do not fit."""
    n = tp * pp
    reserve = activation_reserve_bytes(model, gpu, tp, max_batch_tokens, max_num_seqs)
    free_per_gpu = gpu.mem_bytes * mem_util - reserve - model.weight_bytes / n
    if free_per_gpu <= 0:
        return 0
    return int(free_per_gpu * n // model.kv_bytes_per_token)


def instance_latency(source: LatencySource, model: ModelSpec, gpu: GPUSpec, tp: int, pp: int,
                     pp_stage_overhead_s: float = 1e-3, *, max_batch_tokens: int = 4096,
                     max_num_seqs: int = 512, max_model_len: int | None = None) -> InstanceLatency | None:
    """None when the source has no data for `tp`, or the GPUs cannot hold the weights, the
    activation reserve and the KV of one `max_model_len`-token request (default: the model's)."""
    profile = source.profile(model, tp)
    capacity = kv_capacity_tokens(model, gpu, tp, pp, max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs)
    if profile is None or capacity < (max_model_len or model.max_model_len):
        return None
    return InstanceLatency(tp=tp, pp=pp, profile=profile, kv_capacity_tokens=capacity,
                           pp_stage_overhead_s=pp_stage_overhead_s * pp)
