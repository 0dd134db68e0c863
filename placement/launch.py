"""launch: turn a ServingConfig into running Ray actors — the one place actors are created.

Each instance gets its own placement group (STRICT_PACK: an instance's tp × pp ranks share a
node), one bundle and one actor per rank — or, for an Algorithm 2 plan (`placement.units`), each
unit's paired prefill and decode stages share one (groups.py); resources per actor come from the config's pools, so
custom resources let a CPU box stand in for GPU node types. Rank 0 is the instance's entry point
(the only handle the router gets); the other ranks follow it in lock-step over a process group
whose rendezvous rank 0 picks. Single-rank actors restart on failure (Ray re-runs `__init__`; the
actor loads itself again on its first call) and the router keeps their handles, so a restarted
worker rejoins its pool; a rank of a multi-rank instance cannot rejoin its process group, so
those do not restart. The router runs as an actor too and serves HTTP from its own process, on the
node where `pdserve serve` runs (or `router.node_ip`). Before it starts, launch fails loudly on
pools the cluster cannot hold (feasibility.py) and on KV endpoints one pool cannot reach on the
other (kvtransfer/reach.py). The router is not restarted by Ray (Ray's memory monitor kills
restartable actors first, and the router is small: see router/actor.py): `Deployment.supervise`
(what `pdserve serve` runs while it waits) creates a new one when it died, from the config and
the worker ids.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from pdserve.config import PoolConfig, ServingConfig
from pdserve.decode.actor import DecodeActor
from pdserve.placement.feasibility import LaunchError, check_placeable, describe
from pdserve.placement.groups import Rank, group_specs, pools
from pdserve.placement.restarting import RestartingResponder
from pdserve.prefill.actor import PrefillActor
from pdserve.router.actor import RouterActor, worker_actor_name
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
    cfg: ServingConfig | None = None  # what a new router is made from (None: a dead router stays dead)
    num_router_restarts: int = 0  # routers created because the previous one died
    _stand_in: RestartingResponder | None = field(default=None, repr=False)
    _spare: Any = field(default=None, repr=False)  # a prepared router, not serving: the next one
    _num_routers: int = field(default=1, repr=False)  # made so far (each gets its own actor name)

    def step_logs(self, since: dict[str, int] | None = None, timeout_s: float = 60.0
                  ) -> dict[str, tuple[int, list[StepRecord]]]:
        """Every instance's engine steps (rank 0's) numbered from `since[worker_id]` (default 0)
        onwards: {worker_id: (number of the first, records)}. Poll with number + len(records)."""
        actors = {**self.prefill, **self.decode}
        since = since or {}
        logs = ray.get([a.step_log.remote(since.get(w, 0)) for w, a in actors.items()], timeout=timeout_s)
        return dict(zip(actors, logs))

    def ensure_router(self, timeout_s: float = 10.0) -> str:
        """Start the router (a no-op when it serves; a new one when it died) and check that HTTP is
        up; returns its URL. Raises a Ray error while it cannot answer, RuntimeError if not serving."""
        try:
            return self._start_router(timeout_s)
        except ray.exceptions.ActorDiedError:  # dead for good (max_restarts=0); not merely slow
            if self.cfg is None:
                raise
            self._replace_router()
            try:
                return self._start_router(max(timeout_s, 60.0))
            except ray.exceptions.ActorDiedError:  # the spare had died too (the memory monitor's newest actor)
                self._replace_router()  # no spare left: a new router
                return self._start_router(max(timeout_s, 60.0))

    def _start_router(self, timeout_s: float) -> str:
        if self._stand_in is not None:  # a new router: prepare it while the stand-in answers 503
            ray.get(self.router.prepare.remote(), timeout=timeout_s)
            self._stand_in.close()
            log.warning("the restarting router's port answered %d requests 503", self._stand_in.num_answered)
            self._stand_in = None
        self.url = ray.get(self.router.start.remote(), timeout=timeout_s)
        ray.get(self.router.check_health.remote(), timeout=timeout_s)
        return self.url

    def _replace_router(self) -> None:
        """The spare (or a new router) for the dead one, on the port it served; until it binds, a
        stand-in there answers 503 with Retry-After (when the router runs on this machine)."""
        cfg = self._router_cfg()
        self.num_router_restarts += 1
        spare, self._spare = self._spare, None
        self.router = spare if spare is not None else self._make_router()
        log.warning("the router died; %s takes over (restart %d)", "its spare" if spare else "a new one",
                    self.num_router_restarts)
        if cfg.router.node_ip is None and self._stand_in is None:
            stand_in = RestartingResponder(cfg.router.host, urlsplit(self.url).port or cfg.router.port)
            self._stand_in = stand_in if stand_in.open() else None

    def _make_router(self) -> Any:
        """A new router actor that prepares itself (workers, tokenizer) at once but does not serve."""
        self._num_routers += 1
        # a new name: Ray holds a dead actor's name while any handle to it lives (callers may keep one)
        router = _create_router(self._router_cfg(), self.prefill, self.decode, f"pdserve-router-{self._num_routers}")
        router.prepare.remote()  # its errors surface when it takes over (prepare is idempotent)
        return router

    def _router_cfg(self) -> ServingConfig:
        """A new router's config: the port the current one serves (the same URL, even for port 0)."""
        assert self.cfg is not None
        port = urlsplit(self.url).port or self.cfg.router.port
        return self.cfg.replace(router=dataclasses.replace(self.cfg.router, port=port))

    def supervise(self, stop: threading.Event, give_up_s: float = 60.0, poll_s: float = 1.0) -> str | None:
        """Until `stop` is set, keep the router serving (see `ensure_router`), with a spare router
        prepared to take over. Returns None when stopped, or why the router is unrecoverable: it has
        not served for `give_up_s`."""
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
            if self._spare is None and self.cfg is not None:  # ready before it is needed: takes over in ~1 s
                try:
                    self._spare = self._make_router()
                except Exception as e:  # noqa: BLE001 - no spare this time: the next poll tries again
                    log.warning("could not prepare a spare router: %s: %s", type(e).__name__, e)
        return None

    def shutdown(self) -> None:
        if self._stand_in is not None:
            self._stand_in.close()
        try:
            ray.get(self.router.stop.remote(), timeout=10)
        except Exception:  # noqa: BLE001 — best effort: the actors are killed next anyway
            pass
        ranks = [a for fs in self.followers.values() for a in fs]
        for actor in [self.router, self._spare, *self.prefill.values(), *self.decode.values(), *ranks]:
            if actor is not None:  # None: a launch that failed before the router existed
                ray.kill(actor, no_restart=True)
        for pg in self.groups:
            remove_placement_group(pg)


def _placement_groups(cfg: ServingConfig, groups: list[PlacementGroup]) -> dict[Rank, tuple[PlacementGroup, int]]:
    """One placement group per `group_specs` entry; where each rank goes: (group, bundle index)."""
    where = {}
    for spec in group_specs(cfg):
        pg = placement_group(list(spec.bundles), strategy="STRICT_PACK", name=spec.name)
        groups.append(pg)
        where.update({rank: (pg, b) for b, rank in enumerate(spec.ranks)})
    return where


def _pool_actors(cls: type, cfg: ServingConfig, pool: PoolConfig, role: str,
                 where: dict[Rank, tuple[PlacementGroup, int]], followers: dict[str, list[Any]]) -> dict[str, Any]:
    """Rank 0 of each instance by worker id; ranks 1.. go into `followers`."""
    remote_cls = ray.remote(cls)  # once per class per launch, never per actor
    world = pool.gpus_per_instance
    actors = {}
    for i in range(pool.instances):
        worker_id = f"{role}-{i}"
        ranks = [remote_cls.options(
            name=worker_actor_name(worker_id) + (f"-rank{r}" if r else ""), num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus, resources=pool.resources or None, max_restarts=-1 if world == 1 else 0,
            max_task_retries=0, max_concurrency=1000,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                where[(role, i, r)][0], placement_group_bundle_index=where[(role, i, r)][1]),
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


def launch(cfg: ServingConfig, ready_timeout_s: float = 600.0, place_timeout_s: float = 30.0) -> Deployment:
    """Start every pool and the router; returns once all instances loaded, every decode instance
    reached every prefill instance's KV endpoints, and HTTP is up. Raises LaunchError when the
    pools cannot be placed within `place_timeout_s` (for nodes to join, then again for the
    placement groups) or a KV endpoint is unreachable."""
    cfg = cfg.resolve_device(ray.cluster_resources().get("GPU", 0))  # auto: cuda + 1 GPU per rank, or cpu
    _wait_placeable(cfg, place_timeout_s)
    groups: list[PlacementGroup] = []
    followers: dict[str, list[Any]] = {}
    where = _placement_groups(cfg, groups)
    prefill = (_pool_actors(PrefillActor, cfg, cfg.prefill, "prefill", where, followers)
               if cfg.mode == "disaggregated" else {})
    decode = _pool_actors(DecodeActor, cfg, cfg.decode, "decode", where, followers)
    router = None
    try:
        _wait_placed(groups, pools(cfg), place_timeout_s)
        _start_all({**prefill, **decode}, followers, ready_timeout_s)
        _check_kv_reach(cfg, prefill, decode, ready_timeout_s)
        router = _create_router(cfg, prefill, decode)
        url = ray.get(router.start.remote(), timeout=ready_timeout_s)
    except BaseException:
        Deployment("", router, prefill, decode, followers, groups).shutdown()
        raise
    return Deployment(url, router, prefill, decode, followers, groups, cfg)


def _create_router(cfg: ServingConfig, prefill: dict[str, Any], decode: dict[str, Any],
                   name: str = "pdserve-router") -> Any:
    """The router actor: not restartable by Ray (the supervisor makes a new one), and only small
    arguments inline (worker ids: it finds the actors by name)."""
    return ray.remote(RouterActor).options(
        name=name, num_cpus=0, max_concurrency=1000, max_restarts=0, max_task_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(_router_node(cfg), soft=False),
    ).remote(cfg, None, tuple(prefill), tuple(decode))


def _wait_placeable(cfg: ServingConfig, timeout_s: float) -> None:
    """Until the live nodes could hold the pools (an autoscaler may still be adding nodes)."""
    deadline = time.monotonic() + timeout_s
    units = [(g.name, g.demand) for g in group_specs(cfg)] if cfg.placement.units else []
    while True:
        try:
            return check_placeable(pools(cfg), ray.nodes(), units)
        except LaunchError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(1.0)


def _wait_placed(groups: list[PlacementGroup], pools: list[tuple[str, PoolConfig]], timeout_s: float) -> None:
    ready, _ = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        raise LaunchError(f"the pools are not placed after {timeout_s:g} s (resources in use or not yet up?). "
                          + describe(pools, ray.nodes(), ray.available_resources()))


def _check_kv_reach(cfg: ServingConfig, prefill: dict[str, Any], decode: dict[str, Any], timeout_s: float) -> None:
    """Every decode instance dials every prefill instance's KV endpoints and, with the torch
    transport (its pairs are dialled from prefill), every prefill instance dials a probe on every
    decode instance. Any unreachable endpoint fails launch, named."""
    if not prefill:
        return
    targets = [e for eps in ray.get([a.kv_endpoints.remote() for a in prefill.values()], timeout=timeout_s)
               for e in eps]
    errors = _dial(decode, targets, timeout_s)
    if cfg.kvtransfer.transport == "torch":
        probes = ray.get([a.open_kv_probe.remote() for a in decode.values()], timeout=timeout_s)
        try:
            errors += _dial(prefill, probes, timeout_s)
        finally:
            ray.get([a.close_kv_probe.remote() for a in decode.values()], timeout=timeout_s)
    if errors:
        raise LaunchError("KV endpoints unreachable: " + " | ".join(errors)
                          + ". Check kvtransfer.advertise_host / bind_host and that these ports are open "
                          "between the prefill and decode nodes.")


def _dial(callers: dict[str, Any], targets: list[Any], timeout_s: float) -> list[str]:
    errors = []
    for ref in [a.check_kv_peers.remote(targets) for a in callers.values()]:
        try:
            ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayTaskError as e:
            errors.append(str(e.cause) if e.cause is not None else str(e).strip().splitlines()[-1])
    return errors


def _router_node(cfg: ServingConfig) -> str:
    """The Ray node id the router runs on: the one with `router.node_ip`, else this driver's node."""
    if cfg.router.node_ip is None:
        return ray.get_runtime_context().get_node_id()
    alive = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
    if cfg.router.node_ip not in alive:
        raise LaunchError(f"router.node_ip: no live Ray node has IP {cfg.router.node_ip} "
                          f"(nodes: {', '.join(sorted(alive))})")
    return alive[cfg.router.node_ip]
