"""Putting a plan's instances onto nodes: each pipeline stage of an instance is a TP group that
must sit inside one node; low-affinity units also keep a stage's prefill and decode segments on
one node. First-fit decreasing over groups of GPUs; None when they do not fit."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from pdserve.placement.candidates import Unit
from pdserve.placement.hardware import ClusterSpec


@dataclass(frozen=True)
class Segment:
    role: str  # "prefill" | "decode" | "colocated"
    instance: int
    stage: int
    node: int
    gpus: tuple[int, ...]  # GPU indices within the node


def _groups(unit: Unit, replicas: int) -> list[list[tuple[str, int, int, int]]]:
    """Groups of (role, instance, stage, tp) that must share a node."""
    groups: list[list[tuple[str, int, int, int]]] = []
    roles = [("colocated" if unit.decode is None else "prefill", unit.prefill, unit.num_prefill)]
    if unit.decode is not None:
        roles.append(("decode", unit.decode, unit.num_decode))
    if unit.algorithm == "low-affinity":
        pp_cross = _common_stages(unit)
        for r in range(replicas):
            for x in range(pp_cross):  # one node-group per cross-node stage
                group = []
                for role, cfg, count in roles:
                    per = cfg.pp // pp_cross
                    for i in range(count):
                        inst = r * count + i
                        group += [(role, inst, x * per + s, cfg.tp) for s in range(per)]
                groups.append(group)
        return groups
    for role, cfg, count in roles:
        for inst in range(replicas * count):
            groups += [[(role, inst, s, cfg.tp)] for s in range(cfg.pp)]
    return groups


def _common_stages(unit: Unit) -> int:
    """Stages split across nodes: the largest count dividing both PP degrees."""
    return math.gcd(unit.prefill.pp, unit.decode.pp) if unit.decode else 1


def _node_range(cluster: ClusterSpec, role: str) -> range:
    """Nodes a segment of `role` may use (a phase-split cluster keeps prefill on its own nodes)."""
    if cluster.prefill_nodes is None:
        return range(cluster.num_nodes)
    if role == "prefill":
        return range(cluster.prefill_nodes)
    return range(cluster.prefill_nodes, cluster.num_nodes)


def pack(unit: Unit, replicas: int, cluster: ClusterSpec) -> list[Segment] | None:
    free = [cluster.gpus_per_node] * cluster.num_nodes
    placed: list[Segment] = []
    groups = sorted(_groups(unit, replicas), key=lambda g: -sum(tp for *_, tp in g))
    for group in groups:
        size = sum(tp for *_, tp in group)
        node = next((n for n in _node_range(cluster, group[0][0]) if free[n] >= size), None)
        if node is None:
            return None
        base = cluster.gpus_per_node - free[node]
        for role, inst, stage, tp in group:
            placed.append(Segment(role, inst, stage, node, tuple(range(base, base + tp))))
            base += tp
        free[node] -= size
    return sorted(placed, key=lambda s: (s.role, s.instance, s.stage))


def fits(unit: Unit, replicas: int, cluster: ClusterSpec) -> bool:
    """Whether `pack` succeeds, without building the segments: first-fit decreasing places a run
    of equal-size groups node after node, each node taking as many as its free GPUs hold (once a
    node cannot take one more, no later group of that size or larger fits it either)."""
    free = [cluster.gpus_per_node] * cluster.num_nodes
    for (size, role), count in sorted(_group_sizes(unit).items(), key=lambda kv: -kv[0][0]):
        left = replicas * count
        for n in _node_range(cluster, role):
            if left == 0:
                break
            take = min(left, free[n] // size)
            free[n] -= take * size
            left -= take
        if left:
            return False
    return True


@functools.lru_cache(maxsize=65536)
def _group_sizes(unit: Unit) -> dict[tuple[int, str], int]:
    """(GPUs per node-group, its first role) → groups of that kind in one replica (as `_groups` builds them)."""
    out: dict[tuple[int, str], int] = {}
    for group in _groups(unit, 1):
        key = (sum(tp for *_, tp in group), group[0][0])
        out[key] = out.get(key, 0) + 1
    return out


def max_replicas(unit: Unit, cluster: ClusterSpec) -> int:
    """Most replicas of `unit` that `pack` places (bisection: feasibility only drops as replicas grow)."""
    lo, hi = 0, cluster.num_gpus // unit.num_gpus
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(unit, mid, cluster):
            lo = mid
        else:
            hi = mid - 1
    return lo
