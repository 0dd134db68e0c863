"""`pdserve chaos`'s lifecycle cells: faults injected at every window of a disaggregated request's life
on a real local Ray deployment (router, one prefill and one decode instance, the real model).

Each cell streams one request through the OpenAI API with the cell's fault point armed
(pdserve/faultpoints.py: the request is held at its window while the fault is injected), then checks
the invariants: the client got exactly the greedy text or an explicit error (an error event, an
error status, a broken stream when the router itself died), never a hang past the request bound;
every KV block on both sides free again (back to the instance's baseline) within the lease; the
router's pending count back to 0; both pools whole (/health: every instance healthy) and serving the
exact greedy text again. `recovered_s` is the time from the fault until then.
Faults: kill the prefill worker, kill the decode worker (Ray kills the process; it restarts and
rejoins), kill the router (the supervisor `pdserve serve` runs starts it again), client disconnect.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import httpx
import ray

from pdserve import faultpoints
from pdserve.chaos import Cell
from pdserve.chaos_hooks import start_coordinator
from pdserve.config import EngineConfig, KVTransferConfig, RouterConfig, ServingConfig

FAULTS = ("kill-prefill", "kill-decode", "kill-router", "disconnect")
WINDOWS = tuple(faultpoints.SITES)
NTH = {"decode.step": 3}  # mid-decode: held at the third decode step (first token + 2 streamed)
REDUCED = [("router.queued", "kill-router"), ("prefill.waiting", "kill-prefill"), ("prefill.forward", "disconnect"),
           ("router.prefilled", "kill-prefill"), ("decode.pull", "disconnect"), ("decode.step", "kill-decode"),
           ("router.finished", "kill-decode")]
PROMPT = "The capital of France is"


def lifecycle_cells(reduced: bool) -> list[tuple[str, str]]:
    """One fault per window (every fault used), or every fault at every window."""
    return list(REDUCED) if reduced else [(w, f) for w in WINDOWS for f in FAULTS]


def _free_port(host: str) -> int:
    """A port free on `host` now: the router keeps it across restarts, so the rig's URL stays valid."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LifecycleRig:
    """Launches the deployment (call after `ray.init` with chaos_hooks.SETUP_HOOK); `close()` ends it."""

    def __init__(self, model: str, reference: str, transport: str = "grpc", timeout_s: float = 3.0,
                 lease_s: float = 5.0, max_tokens: int = 12) -> None:
        from pdserve.placement.launch import launch

        self.reference, self.max_tokens = reference, max_tokens
        self.cfg = ServingConfig(model=model, engine=EngineConfig(device="cpu", num_threads=1),
                                 kvtransfer=KVTransferConfig(transport=transport, timeout_s=timeout_s, lease_s=lease_s),
                                 router=RouterConfig(port=_free_port(RouterConfig.host), request_timeout_s=120.0))
        self.request_bound_s = 150.0  # the router's timeout, plus a margin: past it the request hung
        self.coordinator = start_coordinator()
        self.dep = launch(self.cfg)
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self.dep.supervise, args=(self._stop,), kwargs={"poll_s": 0.5},
                                            daemon=True)
        self._supervisor.start()
        self.workers = {**self.dep.prefill, **self.dep.decode}
        try:
            outcome = asyncio.run(self._stream())
            if outcome != "exact":
                raise RuntimeError(f"chaos: the deployment does not serve the greedy text before any fault: {outcome}")
            self.baseline = asyncio.run(self._free_blocks())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._stop.set()
        self._supervisor.join(10)
        self.dep.shutdown()

    def run_cell(self, window: str, fault: str) -> Cell:
        return asyncio.run(self._cell(Cell(window, fault)))

    async def _cell(self, cell: Cell) -> Cell:
        await self.coordinator.arm.remote(cell.window, NTH.get(cell.window, 1))
        start = time.monotonic()
        client = asyncio.ensure_future(self._stream())
        hit, fault_s = await self.coordinator.wait_reached.remote(60.0), 0.0
        if hit is None:
            cell.reason = f"the window {cell.window} was never reached"
        else:
            fault_s = time.monotonic()
            self._inject(cell.fault, client)
        await self.coordinator.release.remote()
        try:
            outcome = await asyncio.wait_for(asyncio.shield(client), self.request_bound_s)
        except asyncio.CancelledError:
            outcome = "disconnected"
        except asyncio.TimeoutError:
            client.cancel()
            outcome, cell.reason = "hang", cell.reason or f"hang: no end within {self.request_bound_s:.0f} s"
        cell.seconds = round(time.monotonic() - start, 3)
        cell.outcomes.append(outcome)
        if outcome == "WRONG":
            cell.reason = cell.reason or "the text differs from the greedy text"
        if hit is not None:
            await self._check_recovery(cell, fault_s)
        cell.ok = not cell.reason
        return cell

    def _inject(self, fault: str, client: asyncio.Future[str]) -> None:
        if fault == "disconnect":
            client.cancel()  # closes the HTTP connection mid-request
        elif fault == "kill-router":
            ray.kill(self.dep.router, no_restart=False)
        else:
            pool = self.dep.prefill if fault == "kill-prefill" else self.dep.decode
            ray.kill(next(iter(pool.values())), no_restart=False)

    async def _check_recovery(self, cell: Cell, fault_s: float) -> None:
        """Blocks back to baseline, nothing pending, pools whole and serving exactly again."""
        ended = time.monotonic()
        bound = ended + self.cfg.kvtransfer.lease_s + 60.0  # the lease, and a restarted instance's reload
        while (free := await self._free_blocks()) != self.baseline:
            if time.monotonic() > bound:
                cell.reason = cell.reason or f"KV leaked: free blocks {free}, baseline {self.baseline}"
                return
            await asyncio.sleep(0.2)
        cell.blocks_free_s = round(time.monotonic() - ended, 3)
        while (problem := await self._unwhole()) is not None:
            if time.monotonic() > bound:
                cell.reason = cell.reason or problem
                return
            await asyncio.sleep(0.2)
        cell.recovered_s = round(time.monotonic() - fault_s, 3)

    async def _unwhole(self) -> str | None:
        """Why the deployment is not whole yet, or None."""
        try:
            pending = await asyncio.wait_for(self.dep.router.num_pending.remote(), 10)
            async with httpx.AsyncClient(timeout=10) as http:
                reply = await http.get(f"{self.dep.url}/health")
        except Exception as e:  # noqa: BLE001 - the router is restarting: not whole yet
            return f"router not serving: {type(e).__name__}"
        if reply.status_code != 200:  # e.g. 503 from the stand-in while a new router takes over
            return f"router not serving: HTTP {reply.status_code}"
        health = reply.json()
        if pending:
            return f"the router still holds {pending} requests"
        broken = {role: health[role] for role in ("prefill", "decode")
                  if health[role]["healthy"] != health[role]["total"]}
        if health.get("status") != "ok" or broken:
            return f"pools not whole: {broken or health}"
        outcome = await self._stream()
        return None if outcome == "exact" else f"after the fault the deployment answers: {outcome}"

    async def _free_blocks(self) -> dict[str, int]:
        out = {}
        for wid, actor in self.workers.items():
            try:
                out[wid] = (await asyncio.wait_for(actor.stats.remote(), 30)).num_free_blocks
            except Exception:  # noqa: BLE001 - restarting: -1 is never the baseline, so it is waited for
                out[wid] = -1
        return out

    async def _stream(self) -> str:
        """Stream the cell's request: "exact", "WRONG", or "error: ..." (what the client saw)."""
        body = {"model": self.cfg.model, "prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0.0,
                "stream": True, "ignore_eos": True}
        text, done = "", False
        try:
            async with httpx.AsyncClient(timeout=self.request_bound_s) as http, \
                    http.stream("POST", f"{self.dep.url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return f"error: HTTP {r.status_code}"
                async for line in r.aiter_lines():
                    done = done or line == "data: [DONE]"
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return f"error: {event['error'].get('message', event['error'])}"
                    text += "".join(c.get("text") or "" for c in event.get("choices", []))
        except httpx.HTTPError as e:
            return f"error: {type(e).__name__} (the stream broke)"
        if not done:
            return "error: the stream ended without [DONE]"
        return "exact" if text == self.reference else "WRONG"
