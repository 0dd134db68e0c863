"""launch: turn a ServingConfig into running Ray actors — the one place actors are created.

Each instance gets its own placement group (STRICT_PACK: an instance's tp × pp ranks share a
node); resources per actor come from the config's pools, so custom resources let a CPU box stand
in for GPU node types. Worker actors restart on failure (Ray re-runs `__init__`; the actor loads
itself again on its first call) and the router keeps their handles, so a restarted worker
rejoins its pool. The router runs as an actor too and serves HTTP from its own process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.config import ConfigError, PoolConfig, ServingConfig
from pdserve.decode.actor import DecodeActor
from pdserve.prefill.actor import PrefillActor
from pdserve.router.actor import RouterActor


@dataclass
class Deployment:
    url: str
    router: Any
    prefill: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)
    groups: list[PlacementGroup] = field(default_factory=list)

    def shutdown(self) -> None:
        try:
            ray.get(self.router.stop.remote(), timeout=10)
        except Exception:  # noqa: BLE001 — best effort: the actors are killed next anyway
            pass
        for actor in [self.router, *self.prefill.values(), *self.decode.values()]:
            ray.kill(actor, no_restart=True)
        for pg in self.groups:
            remove_placement_group(pg)


def _check_supported(cfg: ServingConfig) -> None:
    for name, pool in (("prefill", cfg.prefill), ("decode", cfg.decode)):
        if pool.tp * pool.pp != 1:
            raise ConfigError(f"{name}.tp/{name}.pp: serving instances run one rank each in this release "
                              f"(got tp={pool.tp}, pp={pool.pp}); the engine's TP/PP transforms are used offline")


def _pool_actors(cls: type, cfg: ServingConfig, pool: PoolConfig, role: str,
                 groups: list[PlacementGroup]) -> dict[str, Any]:
    remote_cls = ray.remote(cls)  # once per class per launch, never per actor
    bundle = {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {}), **pool.resources}
    actors = {}
    for i in range(pool.instances):
        pg = placement_group([bundle] * pool.gpus_per_instance, strategy="STRICT_PACK", name=f"pdserve-{role}-{i}")
        groups.append(pg)
        worker_id = f"{role}-{i}"
        actors[worker_id] = remote_cls.options(
            name=f"pdserve-{worker_id}", num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
            resources=pool.resources or None, max_restarts=-1, max_task_retries=0, max_concurrency=1000,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote(cfg, worker_id)
    return actors


def launch(cfg: ServingConfig, ready_timeout_s: float = 600.0) -> Deployment:
    """Start every pool and the router; returns once all instances loaded and HTTP is up."""
    _check_supported(cfg)
    groups: list[PlacementGroup] = []
    prefill = _pool_actors(PrefillActor, cfg, cfg.prefill, "prefill", groups) if cfg.mode == "disaggregated" else {}
    decode = _pool_actors(DecodeActor, cfg, cfg.decode, "decode", groups)
    ray.get([pg.ready() for pg in groups], timeout=ready_timeout_s)
    ray.get([a.start.remote() for a in [*prefill.values(), *decode.values()]], timeout=ready_timeout_s)
    router = ray.remote(RouterActor).options(name="pdserve-router", num_cpus=0, max_concurrency=1000).remote(cfg)
    url = ray.get(router.start.remote(prefill, decode), timeout=ready_timeout_s)
    return Deployment(url, router, prefill, decode, groups)
