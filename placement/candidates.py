"""What the search enumerates: per-phase (TP, PP) configs, and units — the smallest group of
instances a plan replicates (n prefill + m decode instances, or one colocated instance).

Algorithm 1 (high node-affinity) pairs the best prefill and decode configs at prefill:decode
ratios that balance their goodputs. Algorithm 2 (low node-affinity) cuts both into `pp_cross`
node-spanning stages and packs k_p prefill and k_d decode segments of each stage into one node,
so KV moves over the intra-node link. Colocated units are one TP instance doing both phases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdserve.placement.hardware import ClusterSpec
from pdserve.placement.model_spec import ModelSpec

Algorithm = Literal["high-affinity", "low-affinity", "colocated"]


@dataclass(frozen=True, order=True)
class PhaseConfig:
    tp: int
    pp: int

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"TP{self.tp}" + (f"×PP{self.pp}" if self.pp > 1 else "")


@dataclass(frozen=True, kw_only=True)
class Unit:
    algorithm: Algorithm
    prefill: PhaseConfig
    num_prefill: int = 1
    decode: PhaseConfig | None = None  # None: colocated
    num_decode: int = 0
    colocated_policy: Literal["prefill_priority", "chunked"] = "prefill_priority"
    intra_node_transfer: bool = True  # KV moves over the intra-node link (else the network)

    @property
    def mode(self) -> Literal["disaggregated", "colocated"]:
        return "colocated" if self.decode is None else "disaggregated"

    @property
    def num_gpus(self) -> int:
        d = self.decode.num_gpus * self.num_decode if self.decode else 0
        return self.prefill.num_gpus * self.num_prefill + d

    def describe(self) -> str:
        if self.decode is None:
            return f"colocated {self.prefill} ({self.colocated_policy.replace('_', '-')})"
        return f"{self.num_prefill}×P {self.prefill} + {self.num_decode}×D {self.decode}"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def phase_configs(model: ModelSpec, cluster: ClusterSpec) -> list[PhaseConfig]:
    """TP within a node and dividing the heads; PP dividing the layers; within the cluster."""
    return [PhaseConfig(tp, pp)
            for tp in range(1, cluster.gpus_per_node + 1) if model.valid_tp(tp)
            for pp in divisors(model.num_layers) if tp * pp <= cluster.num_gpus]


def ratio_units(p: PhaseConfig, d: PhaseConfig, cluster: ClusterSpec, max_instances: int = 4) -> list[Unit]:
    """Algorithm 1 units for one (prefill, decode) pair: every n_p:n_d up to `max_instances` each
    that fits (the ratio is a search dimension; the SLO does not change which units exist)."""
    out = []
    for n_p in range(1, max_instances + 1):
        for n_d in range(1, max_instances + 1):
            gpus = n_p * p.num_gpus + n_d * d.num_gpus
            if gpus <= cluster.num_gpus:
                out.append(Unit(algorithm="high-affinity", prefill=p, num_prefill=n_p, decode=d, num_decode=n_d,
                                intra_node_transfer=gpus <= cluster.gpus_per_node and cluster.prefill_nodes is None))
    return out


def low_affinity_units(configs: set[PhaseConfig], model: ModelSpec, cluster: ClusterSpec) -> list[Unit]:
    """Algorithm 2 units: `pp_cross` stages over as many nodes; per node, k_p prefill segments of
    (tp_p, pp_p) and k_d decode segments of (tp_d, pp_d) share the node (so each instance has
    pp = pp_cross·pp_seg and is in `configs`)."""
    out: list[Unit] = []
    m = cluster.gpus_per_node
    if cluster.prefill_nodes is not None:
        return out  # phase-split node types: a node never holds both phases
    for pp_cross in divisors(model.num_layers):
        if pp_cross > cluster.num_nodes:
            break
        segs = sorted({PhaseConfig(c.tp, c.pp // pp_cross) for c in configs
                       if c.pp % pp_cross == 0 and c.num_gpus // pp_cross <= m})
        for sp in segs:
            for sd in segs:
                for k_p in range(1, m // sp.num_gpus + 1):
                    for k_d in range(1, (m - k_p * sp.num_gpus) // sd.num_gpus + 1):
                        out.append(Unit(algorithm="low-affinity",
                                        prefill=PhaseConfig(sp.tp, sp.pp * pp_cross), num_prefill=k_p,
                                        decode=PhaseConfig(sd.tp, sd.pp * pp_cross), num_decode=k_d))
    return out


def colocated_units(configs: set[PhaseConfig]) -> list[Unit]:
    return [Unit(algorithm="colocated", prefill=c, colocated_policy=policy)
            for c in sorted(configs) if c.pp == 1 for policy in ("prefill_priority", "chunked")]
