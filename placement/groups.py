"""The placement groups a serving config asks Ray for — pure, no ray import, so a plan's
placement can be checked without a cluster.

Every group is STRICT_PACK (all its bundles on one node), one bundle per rank, in order:

  placement.units: 0   one group per instance (its tp × pp ranks), named pdserve-{role}-{i}
  placement.units: N   Algorithm 2: each pool splits into N units in order; per unit and node
                       group g, one group holding the ranks of every pipeline stage s of the
                       unit's prefill and decode instances with s × node_groups // pp == g,
                       named pdserve-unit{u}-node{g}. Stages planned for one node share one.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.config import PoolConfig, ServingConfig
from pdserve.placement.feasibility import bundle

Rank = tuple[str, int, int]  # (role, instance, rank within the instance)


@dataclass(frozen=True)
class GroupSpec:
    name: str
    ranks: tuple[Rank, ...]  # bundle i holds ranks[i]
    bundles: tuple[dict[str, float], ...]

    @property
    def demand(self) -> dict[str, float]:
        """What one node must hold for this group."""
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return {k: v for k, v in out.items() if v}


def pools(cfg: ServingConfig) -> list[tuple[str, PoolConfig]]:
    """The pools `cfg` runs: (role, pool)."""
    return ([("prefill", cfg.prefill)] if cfg.mode == "disaggregated" else []) + [("decode", cfg.decode)]


def group_specs(cfg: ServingConfig) -> list[GroupSpec]:
    units, node_groups = cfg.placement.units, cfg.placement.node_groups
    if units == 0:
        return [GroupSpec(f"pdserve-{role}-{i}", tuple((role, i, r) for r in range(pool.gpus_per_instance)),
                          (bundle(pool),) * pool.gpus_per_instance)
                for role, pool in pools(cfg) for i in range(pool.instances)]
    out = []
    for u in range(units):
        for g in range(node_groups):
            ranks, bundles = [], []
            for role, pool in pools(cfg):
                per = pool.instances // units
                for i in range(u * per, (u + 1) * per):
                    for r in range(pool.gpus_per_instance):
                        if (r // pool.tp) * node_groups // pool.pp == g:  # rank r is stage r // tp
                            ranks.append((role, i, r))
                            bundles.append(bundle(pool))
            out.append(GroupSpec(f"pdserve-unit{u}-node{g}", tuple(ranks), tuple(bundles)))
    return out
