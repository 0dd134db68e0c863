"""Analytic latency coefficients from a GPU spec and the model's shapes, for hardware nobody has
profiled yet (DistServe Appendix A, with the constants made explicit):

  prefill  matmuls are compute-bound: b = FLOPs/token ÷ (tp·peak·mfu); attention adds
           c·Σl² with c = 2·h·L ÷ (tp·peak·attn_eff); a = fixed overhead + one weight read
  decode   memory-bound: a = weight bytes ÷ (tp·HBM·mbu) + overhead; b = KV bytes/token ÷ (tp·HBM·mbu);
           c = FLOPs/token ÷ (tp·peak·mfu) (the compute a batch adds)
  TP       two all-reduces of h values per layer and token over the intra-node link.
Efficiencies default to what DistServe's A100 OPT-13B fit implies (≈0.8 MFU, ≈0.65 of HBM).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.placement.hardware import GPUSpec
from pdserve.placement.latency import Coeffs, PhaseProfile
from pdserve.placement.model_spec import ModelSpec


@dataclass(frozen=True, kw_only=True)
class Roofline:
    """A `LatencySource` computed from `gpu`; valid for any TP that divides the model's heads."""

    gpu: GPUSpec
    mfu: float = 0.8
    attn_eff: float = 0.4
    mbu: float = 0.65
    overhead_s: float = 4e-3  # per forward: launches, sampling, Python
    allreduce_latency_s: float = 10e-6

    @property
    def name(self) -> str:
        return f"roofline-{self.gpu.name}"

    def profile(self, model: ModelSpec, tp: int) -> PhaseProfile | None:
        if not model.valid_tp(tp):
            return None
        flops = self.gpu.peak_tflops * 1e12 * tp
        hbm = self.gpu.mem_gbps * 1e9 * tp * self.mbu
        comm_per_token = 0.0
        comm_fixed = 0.0
        if tp > 1:  # ring all-reduce moves 2(tp−1)/tp of the data per GPU, twice per layer
            per_layer_bytes = 2 * (tp - 1) / tp * model.hidden_size * model.dtype_bytes
            comm_per_token = 2 * model.num_layers * per_layer_bytes / (self.gpu.link_gbps * 1e9)
            comm_fixed = 2 * model.num_layers * self.allreduce_latency_s
        weights_s = model.weight_bytes / hbm
        per_token_s = model.flops_per_token() / (flops * self.mfu) + comm_per_token
        prefill = Coeffs(self.overhead_s + weights_s + comm_fixed, per_token_s,
                         2 * model.hidden_size * model.num_layers / (flops * self.attn_eff))
        decode = Coeffs(self.overhead_s + weights_s + comm_fixed, model.kv_bytes_per_token / hbm, per_token_s)
        return PhaseProfile(prefill=prefill, decode_small=decode, decode_large=decode)
