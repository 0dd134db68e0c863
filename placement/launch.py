"""launch: turn a ServingConfig into running Ray actors — the one place actors are created.

Each instance gets its own placement group (STRICT_PACK: an instance's tp × pp ranks share a
node), one bundle and one actor per rank; resources per actor come from the config's pools, so
custom resources let a CPU box stand in for GPU node types. Rank 0 is the instance's entry point
(the only handle the router gets); the other ranks follow it in lock-step over a process group
whose rendezvous rank 0 picks. Single-rank actors restart on failure (Ray re-runs `__init__`; the
actor loads itself again on its first call) and the router keeps their handles, so a restarted
worker rejoins its pool; a rank of a multi-rank instance cannot rejoin its process group, so
those do not restart. The router runs as an actor too and serves HTTP from its own process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.config import PoolConfig, ServingConfig
from pdserve.decode.actor import DecodeActor
from pdserve.prefill.actor import PrefillActor
from pdserve.router.actor import RouterActor
from pdserve.types import StepRecord


@dataclass
class Deployment:
    url: str
    router: Any
    prefill: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)
    followers: dict[str, list[Any]] = field(default_factory=dict)  # ranks 1.. of each instance
    groups: list[PlacementGroup] = field(default_factory=list)

    def step_logs(self, since: dict[str, int] | None = None, timeout_s: float = 60.0
                  ) -> dict[str, tuple[int, list[StepRecord]]]:
        """Every instance's engine steps (rank 0's) numbered from `since[worker_id]` (default 0)
        onwards: {worker_id: (number of the first, records)}. Poll with number + len(records)."""
        actors = {**self.prefill, **self.decode}
        since = since or {}
        logs = ray.get([a.step_log.remote(since.get(w, 0)) for w, a in actors.items()], timeout=timeout_s)
        return dict(zip(actors, logs))

    def shutdown(self) -> None:
        try:
            ray.get(self.router.stop.remote(), timeout=10)
        except Exception:  # noqa: BLE001 — best effort: the actors are killed next anyway
            pass
        ranks = [a for fs in self.followers.values() for a in fs]
        for actor in [self.router, *self.prefill.values(), *self.decode.values(), *ranks]:
            ray.kill(actor, no_restart=True)
        for pg in self.groups:
            remove_placement_group(pg)


def _pool_actors(cls: type, cfg: ServingConfig, pool: PoolConfig, role: str, groups: list[PlacementGroup],
                 followers: dict[str, list[Any]]) -> dict[str, Any]:
    """Rank 0 of each instance by worker id; ranks 1.. go into `followers`."""
    remote_cls = ray.remote(cls)  # once per class per launch, never per actor
    bundle = {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {}), **pool.resources}
    world = pool.gpus_per_instance
    actors = {}
    for i in range(pool.instances):
        pg = placement_group([bundle] * world, strategy="STRICT_PACK", name=f"pdserve-{role}-{i}")
        groups.append(pg)
        worker_id = f"{role}-{i}"
        ranks = [remote_cls.options(
            name=f"pdserve-{worker_id}" + (f"-rank{r}" if r else ""), num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus, resources=pool.resources or None, max_restarts=-1 if world == 1 else 0,
            max_task_retries=0, max_concurrency=1000,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
        ).remote(cfg, worker_id, r) for r in range(world)]
        actors[worker_id] = ranks[0]
        if world > 1:
            followers[worker_id] = ranks[1:]
    return actors


def _start_all(entry: dict[str, Any], followers: dict[str, list[Any]], timeout_s: float) -> None:
    """Start every instance; a multi-rank instance's ranks start together (they join one group)."""
    inits = dict(zip(followers, ray.get([entry[w].rendezvous.remote() for w in followers], timeout=timeout_s)))
    starts = [a.start.remote(inits[w]) for w, fs in followers.items() for a in fs]
    starts += [a.start.remote(inits.get(w, "")) for w, a in entry.items()]
    ray.get(starts, timeout=timeout_s)


def launch(cfg: ServingConfig, ready_timeout_s: float = 600.0) -> Deployment:
    """Start every pool and the router; returns once all instances loaded and HTTP is up."""
    cfg = cfg.resolve_device(ray.cluster_resources().get("GPU", 0))  # auto: cuda + 1 GPU per rank, or cpu
    groups: list[PlacementGroup] = []
    followers: dict[str, list[Any]] = {}
    prefill = (_pool_actors(PrefillActor, cfg, cfg.prefill, "prefill", groups, followers)
               if cfg.mode == "disaggregated" else {})
    decode = _pool_actors(DecodeActor, cfg, cfg.decode, "decode", groups, followers)
    ray.get([pg.ready() for pg in groups], timeout=ready_timeout_s)
    _start_all({**prefill, **decode}, followers, ready_timeout_s)
    router = ray.remote(RouterActor).options(name="pdserve-router", num_cpus=0, max_concurrency=1000).remote(cfg)
    url = ray.get(router.start.remote(prefill, decode), timeout=ready_timeout_s)
    return Deployment(url, router, prefill, decode, followers, groups)
