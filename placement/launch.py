"""launch: turn a ServingConfig into running Ray actors — the one place actors are created.

Each instance gets its own placement group (STRICT_PACK: an instance's tp × pp ranks share a
node), one bundle and one actor per rank; resources per actor come from the config's pools, so
custom resources let a CPU box stand in for GPU node types. Rank 0 is the instance's entry point
(the only handle the router gets); the other ranks follow it in lock-step over a process group
whose rendezvous rank 0 picks. Single-rank actors restart on failure (Ray re-runs `__init__`; the
actor loads itself again on its first call) and the router keeps their handles, so a restarted
worker rejoins its pool; a rank of a multi-rank instance cannot rejoin its process group, so
those do not restart. The router runs as an actor too and serves HTTP from its own process; it
restarts as well (it holds every worker handle from construction), and `Deployment.supervise`
(what `pdserve serve` runs while it waits) starts a restarted router again.
"""

from __future__ import annotations

import logging
import threading
import time
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

log = logging.getLogger(__name__)


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

    def ensure_router(self, timeout_s: float = 10.0) -> str:
        """Start the router if Ray restarted it (a no-op when it serves) and check that HTTP is up;
        returns its URL. Raises a Ray error while it is dead or restarting, RuntimeError if not serving."""
        self.url = ray.get(self.router.start.remote(), timeout=timeout_s)
        ray.get(self.router.check_health.remote(), timeout=timeout_s)
        return self.url

    def supervise(self, stop: threading.Event, give_up_s: float = 60.0, poll_s: float = 1.0) -> str | None:
        """Until `stop` is set, keep the router serving (see `ensure_router`). Returns None when
        stopped, or why the router is unrecoverable: it has not served for `give_up_s`."""
        down_since: float | None = None
        while not stop.wait(poll_s):
            try:
                url = self.ensure_router(timeout_s=max(poll_s, 10.0))
            except Exception as e:  # noqa: BLE001 - dead, restarting, or failing to bind: wait, then give up
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    log.warning("router is down (%s); waiting for it to restart", type(e).__name__)
                if now - down_since > give_up_s:
                    return f"the router has not served for {give_up_s:g} s: {type(e).__name__}: {e}"
                continue
            if down_since is not None:
                log.warning("router serves again at %s after %.1f s", url, time.monotonic() - down_since)
                down_since = None
        return None

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
    groups: list[PlacementGroup] = []
    followers: dict[str, list[Any]] = {}
    prefill = (_pool_actors(PrefillActor, cfg, cfg.prefill, "prefill", groups, followers)
               if cfg.mode == "disaggregated" else {})
    decode = _pool_actors(DecodeActor, cfg, cfg.decode, "decode", groups, followers)
    ray.get([pg.ready() for pg in groups], timeout=ready_timeout_s)
    _start_all({**prefill, **decode}, followers, ready_timeout_s)
    router = ray.remote(RouterActor).options(name="pdserve-router", num_cpus=0, max_concurrency=1000,
                                             max_restarts=-1, max_task_retries=0).remote(cfg, None, prefill, decode)
    url = ray.get(router.start.remote(), timeout=ready_timeout_s)
    return Deployment(url, router, prefill, decode, followers, groups)
