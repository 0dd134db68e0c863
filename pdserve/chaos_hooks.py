"""The Ray side of `pdserve chaos`'s fault points: a coordinator actor and the handler every process of
the chaos deployment installs (pdserve/faultpoints.py says what a site is).

The driver arms one site; the first time (or the `nth` time) any process reaches it, the coordinator
records it and holds the caller there until the driver has injected its fault and calls `release`.
So a kill lands exactly in its window: the paused process is still inside it, and so is every other
process, since the request cannot move on. A process reaches the coordinator by name; the driver
starts its Ray job with `runtime_env={"worker_process_setup_hook": SETUP_HOOK}` so every actor's
process installs the handler before it runs anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import ray

from pdserve import faultpoints

COORDINATOR = "pdserve-chaos-coordinator"
SETUP_HOOK = "pdserve.chaos_hooks.install_handler"


class FaultCoordinator:
    """One armed site at a time; Ray async actor (its methods interleave on one event loop)."""

    def __init__(self) -> None:
        self._site: str | None = None
        self._nth = 1
        self._hits = 0
        self._reached = asyncio.Event()
        self._release = asyncio.Event()
        self.hit: tuple[str, list[str]] | None = None  # the site and request ids it fired on

    def arm(self, site: str, nth: int = 1) -> None:
        """Hold the `nth` caller of `site` (earlier ones pass) until `release()`."""
        if site not in faultpoints.SITES:
            raise ValueError(f"site: one of {list(faultpoints.SITES)}, got {site!r}")
        self._release.set()  # whatever an earlier cell still held goes on
        self._site, self._nth, self._hits, self.hit = site, nth, 0, None
        self._reached, self._release = asyncio.Event(), asyncio.Event()

    async def reached(self, site: str, request_ids: list[str]) -> None:
        if site != self._site or self.hit is not None:
            return
        self._hits += 1
        if self._hits < self._nth:
            return
        self.hit = (site, request_ids)
        self._reached.set()
        await self._release.wait()

    async def wait_reached(self, timeout_s: float) -> tuple[str, list[str]] | None:
        """The armed site and its request ids once a caller is held there; None after `timeout_s`."""
        try:
            await asyncio.wait_for(self._reached.wait(), timeout_s)
        except asyncio.TimeoutError:
            return None
        return self.hit

    def release(self) -> None:
        """Let the held caller (if it still lives) go on, and disarm."""
        self._site = None
        self._release.set()


class RayHandler:
    """faultpoints.Handler: ask the coordinator at every site reached (chaos deployments only)."""

    def __init__(self) -> None:
        self._coordinator: Any = None

    def _ask(self, site: str, items: Sequence[object]) -> Any:
        if self._coordinator is None:
            self._coordinator = ray.get_actor(COORDINATOR)
        return self._coordinator.reached.remote(site, faultpoints.request_ids(items))

    def reached(self, site: str, items: Sequence[object]) -> None:
        ray.get(self._ask(site, items))

    async def areached(self, site: str, items: Sequence[object]) -> None:
        await self._ask(site, items)


def install_handler() -> None:
    """Ray's worker_process_setup_hook for a chaos deployment: route this process's sites to the
    coordinator."""
    faultpoints.install(RayHandler())


def start_coordinator() -> Any:
    """The coordinator actor (named, so every process of the job finds it); call after ray.init."""
    return ray.remote(FaultCoordinator).options(name=COORDINATOR, num_cpus=0, max_concurrency=64).remote()
