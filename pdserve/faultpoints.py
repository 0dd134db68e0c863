"""Fault points: the named windows of a disaggregated request's life where `pdserve chaos` injects a
fault, as explicit calls in the serving code (not sleeps and luck).

A site calls `reached(site, items)` on a worker's step thread, or `await areached(site, items)` on an
event loop; `items` are the requests (or outputs) there — anything with a `request_id`. With no
handler installed, which is production, both return at once: one global read, nothing built. The
chaos driver installs a handler in every process of its deployment (pdserve/chaos_hooks.py); it
pauses the caller at the one armed site until the fault (a kill, a disconnect) has been injected, so
every cell hits its window exactly. Contract module: imports nothing of pdserve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

SITES: dict[str, str] = {  # site -> the window it opens, in the order of a request's life
    "router.queued": "queued at the router (dispatched, not yet sent to prefill)",
    "prefill.waiting": "waiting for prefill (queued on the prefill instance)",
    "prefill.forward": "during the prefill forward (batch scheduled, forward under way)",
    "router.prefilled": "prefill done, decode not yet told (the router holds the KV handle)",
    "decode.pull": "decode waiting for its pull (started, not yet landed)",
    "decode.step": "mid-decode (a few tokens streamed)",
    "router.finished": "after the last token (the router has it, the request not yet released)",
}


class Handler(Protocol):
    def reached(self, site: str, items: Sequence[object]) -> None: ...

    async def areached(self, site: str, items: Sequence[object]) -> None: ...


_handler: Handler | None = None


def install(handler: Handler | None) -> None:
    """Route every site of this process to `handler` (None: off)."""
    global _handler
    _handler = handler


def reached(site: str, items: Sequence[object]) -> None:
    """A blocking site (a worker's step thread): returns at once unless a handler pauses it here."""
    if _handler is not None and items:
        _handler.reached(site, items)


async def areached(site: str, items: Sequence[object]) -> None:
    """An event-loop site: pauses only the calling task."""
    if _handler is not None and items:
        await _handler.areached(site, items)


def request_ids(items: Sequence[object]) -> list[str]:
    """The request ids of a site's items: ids, objects with a `request_id`, or with a `request` that
    has one (a scheduled chunk)."""
    return [str(getattr(getattr(i, "request", i), "request_id", i)) for i in items]
