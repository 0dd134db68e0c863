"""The latency model: per (model, GPU, TP) fitted coefficients (`PhaseProfile`), and per (TP, PP)
instance the stage times, KV capacity and the way decode iterations grow, which the simulator uses.

  prefill  T = a + b·Σl + c·Σl²    (l: prompt lengths in the batch)
  decode   T = a + b·Σctx + c·B    (B: batch size; `decode_small` up to the threshold, then `decode_large`)

Times are seconds for the whole model on `tp` GPUs. A PP instance splits it into `pp` stages:
a prefill stage takes T/pp + `pp_stage_overhead_s`, a decode stage T/pp (DistServe's model).
"""

from __future__ import annotations

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


@dataclass(frozen=True, kw_only=True)
class PhaseProfile:
    """Fitted full-model times (seconds) of one (model, GPU, TP)."""

    prefill: Coeffs
    decode_small: Coeffs
    decode_large: Coeffs
    large_batch_threshold: int = 95

    def prefill_s(self, sum_len: float, sum_len_sq: float) -> float:
        return self.prefill(sum_len, sum_len_sq)

    def decode_coeffs(self, batch_size: int) -> Coeffs:
        return self.decode_small if batch_size <= self.large_batch_threshold else self.decode_large

    def decode_s(self, sum_ctx: float, batch_size: int) -> float:
        return self.decode_coeffs(batch_size)(sum_ctx, batch_size)


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


def kv_capacity_tokens(model: ModelSpec, gpu: GPUSpec, tp: int, pp: int, mem_util: float = 0.95) -> int:
    """KV tokens a TP×PP instance holds after weights, 1% of memory kept for activations
    (DistServe's rule); <= 0 means the weights do not fit."""
    n = tp * pp
    free_per_gpu = gpu.mem_bytes * (mem_util - 0.01) - model.weight_bytes / n
    if free_per_gpu <= 0:
        return 0
    return int(free_per_gpu * n // model.kv_bytes_per_token)


def instance_latency(source: LatencySource, model: ModelSpec, gpu: GPUSpec, tp: int, pp: int,
                     pp_stage_overhead_s: float = 1e-3) -> InstanceLatency | None:
    """None when the source has no data for `tp` or the weights do not fit on tp·pp GPUs."""
    profile = source.profile(model, tp)
    capacity = kv_capacity_tokens(model, gpu, tp, pp)
    if profile is None or capacity < model.max_model_len:
        return None
    return InstanceLatency(tp=tp, pp=pp, profile=profile, kv_capacity_tokens=capacity,
                           pp_stage_overhead_s=pp_stage_overhead_s * pp)
