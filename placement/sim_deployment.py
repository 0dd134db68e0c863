"""What the simulator runs: a `SimDeployment` (instances with their latency models, transfer, batching
limits) and what comes out: a `SimResult` with per-request TTFT and TPOT."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pdserve.placement.latency import InstanceLatency
from pdserve.placement.transfer import NO_TRANSFER, TransferModel

Phases = Literal["both", "prefill", "decode"]
CHUNK_SIZE = 512  # tokens per chunked-prefill iteration (the serving config's max_num_batched_tokens)


@dataclass(frozen=True, kw_only=True)
class SimDeployment:
    """Disaggregated: `prefill` and `decode` instances. Colocated: `prefill` holds the instances
    (each does both phases; pp must be 1) and `decode` is empty."""

    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    prefill: tuple[InstanceLatency, ...]
    decode: tuple[InstanceLatency, ...] = ()
    transfer: TransferModel = NO_TRANSFER
    prefill_token_budget: int = 4096  # Σ prompt tokens per prefill batch (a longer prompt runs alone)
    max_num_seqs: int = 512  # running requests per decode (or colocated) instance
    decode_token_limit: int | None = None
    """Cap on the KV tokens (prompt + output) a decode instance admits, below its memory: the
    scheduler's batch-token limit (DistServe's decode scheduler uses 65,536)."""
    colocated_policy: Literal["prefill_priority", "chunked"] = "prefill_priority"
    chunk_size: int = CHUNK_SIZE  # tokens per iteration under chunked prefill
    phases: Phases = "both"  # "prefill"/"decode": simulate one phase alone (DistServe Alg. 1)
    pull_at_step_boundary: bool = False
    """A decode instance starts a KV pull only between two of its iterations (pdserve's decode
    worker: the step thread owns the pool), not the moment the request arrives (DistServe's model)."""
    host_slowdown: float = 0.0
    """All instances share one host (CPU engines on one box): a step that starts while another
    instance is busy takes (1 + host_slowdown)× as long. 0 for instances on their own accelerators."""
    prefix_caching: bool = False
    """Every instance keeps finished requests' KV in a prefix cache (engine.enable_prefix_caching):
    a prompt computes only what the instance lacks, a pull moves only what the decode instance lacks
    (sim_reuse.py). Only changes anything on a trace with sessions or shared prefixes."""
    cache_aware: bool = False  # dispatch by the router's cache_aware policies (router.*_policy: cache_aware)
    pd_threshold_tokens: int = 0
    """Conditional disaggregation (router.pd_threshold_tokens): a request with at most this many
    prompt tokens uncached on its decode instance is prefilled there, in chunks inside its steps."""
    pd_prefill_queue_limit: int | None = None  # router.pd_prefill_queue_limit

    def __post_init__(self) -> None:
        if not self.prefill and self.phases != "decode":
            raise ValueError("deployment: needs at least one prefill (or colocated) instance")
        if self.mode == "disaggregated" and not self.decode and self.phases != "prefill":
            raise ValueError("deployment: disaggregated needs at least one decode instance")
        if self.mode == "colocated" and any(i.pp != 1 for i in self.prefill):
            raise ValueError("deployment: colocated instances must have pp == 1")
        conditional = self.pd_threshold_tokens > 0 or self.pd_prefill_queue_limit is not None
        if conditional and (self.mode != "disaggregated" or any(i.pp != 1 for i in self.decode)):
            raise ValueError("deployment: pd_threshold_tokens / pd_prefill_queue_limit need a disaggregated "
                             "deployment with decode pp == 1 (local prefills run in the decode instance's steps)")
        if self.host_slowdown < 0:
            raise ValueError(f"deployment: host_slowdown must be >= 0, got {self.host_slowdown}")

    @property
    def models_reuse(self) -> bool:
        """Whether the simulation needs the session/prefix model (sim_reuse.py)."""
        return self.prefix_caching or self.cache_aware or self.pd_threshold_tokens > 0 or self.pd_prefill_queue_limit is not None

    @property
    def num_gpus(self) -> int:
        return sum(i.num_gpus for i in self.prefill) + sum(i.num_gpus for i in self.decode)

    def decode_capacity(self, inst: InstanceLatency) -> int:
        """KV tokens a decode (or colocated) instance may hold for running requests."""
        if self.decode_token_limit is None:
            return inst.kv_capacity_tokens
        return min(inst.kv_capacity_tokens, self.decode_token_limit)


@dataclass(frozen=True)
class SimResult:
    ttft_s: tuple[float, ...]  # inf: never served (does not fit in memory)
    tpot_s: tuple[float, ...]  # 0 for one-token outputs

    def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
        """Fraction of requests meeting both SLOs (the headline metric)."""
        ok = sum(1 for a, b in zip(self.ttft_s, self.tpot_s) if a <= ttft_slo and b <= tpot_slo)
        return ok / len(self.ttft_s)

    def ttft_attainment(self, ttft_slo: float) -> float:
        return sum(1 for a in self.ttft_s if a <= ttft_slo) / len(self.ttft_s)

    def tpot_attainment(self, tpot_slo: float) -> float:
        return sum(1 for b in self.tpot_s if b <= tpot_slo) / len(self.tpot_s)

    def percentiles(self, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, xs in (("ttft", sorted(self.ttft_s)), ("tpot", sorted(self.tpot_s))):
            for q in qs:
                out[f"{name}_p{q:g}"] = xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]
        return out
