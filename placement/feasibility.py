"""Can the cluster hold the pools? Checked before launch waits on placement groups.

Each instance is one STRICT_PACK placement group of tp × pp bundles, so one node must hold all of
them. Two cases are certain to never place, and fail at once: an instance larger than every live
node, and a pool set whose total demand of some resource exceeds the whole cluster. Anything else
(resources in use, nodes still starting) is left to launch's bounded wait, which reports with
`describe`. Pure: takes Ray's `ray.nodes()` records, imports no ray.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from pdserve.config import PoolConfig

Pools = list[tuple[str, PoolConfig]]


class LaunchError(RuntimeError):
    """The deployment cannot start; the message says what is missing and where."""


def bundle(pool: PoolConfig) -> dict[str, float]:
    """Resources of one rank's actor (one bundle of its instance's placement group)."""
    return {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {}), **pool.resources}


def instance_demand(pool: PoolConfig) -> dict[str, float]:
    return {k: v * pool.gpus_per_instance for k, v in bundle(pool).items() if v}


def check_placeable(pools: Pools, nodes: list[dict[str, Any]],
                    units: Sequence[tuple[str, dict[str, float]]] = ()) -> None:
    """`units`: (name, what one node must hold) of each placement group that pairs instances
    (`placement.units`); they replace the per-instance check (an instance may span node groups)."""
    live = [n for n in nodes if n.get("Alive")]
    problems = [f"no node can hold {name} ({_fmt(need)} on one node: paired prefill and decode stages)"
                for name, need in units if not any(_fits(need, n["Resources"]) for n in live)]
    for role, pool in ([] if units else pools):
        need = instance_demand(pool)
        if not any(_fits(need, n["Resources"]) for n in live):
            problems.append(f"no node can hold one {role} instance ({_fmt(need)} on one node)")
    total: Counter[str] = Counter()
    for _, pool in pools:
        for k, v in instance_demand(pool).items():
            total[k] += v * pool.instances
    have: Counter[str] = Counter()
    for n in live:
        have.update(n["Resources"])
    short = {k: v for k, v in total.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        problems.append("the pools need " + ", ".join(f"{k}: {v:g} (cluster total {have.get(k, 0.0):g})"
                                                      for k, v in sorted(short.items())))
    if problems:
        raise LaunchError("cannot place the pools: " + "; ".join(problems) + ". " + describe(pools, nodes))


def describe(pools: Pools, nodes: list[dict[str, Any]], available: dict[str, float] | None = None) -> str:
    """What each pool needs and what each live node has: the message of a launch that cannot place."""
    wants = "; ".join(f"{role} needs {pool.instances} instance(s) of {_fmt(instance_demand(pool))} "
                      f"on one node each" for role, pool in pools)
    has = "; ".join(f"node {n['NodeManagerAddress']} has {_fmt(n['Resources'])}" for n in nodes if n.get("Alive"))
    free = f". Available now: {_fmt(available)}" if available is not None else ""
    return f"{wants}. {has or 'no live nodes'}{free}."


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def _fmt(res: dict[str, float]) -> str:
    shown = {k: v for k, v in res.items()
             if not k.startswith("node:") and "memory" not in k and "_group_" not in k}  # Ray's own keys
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"
