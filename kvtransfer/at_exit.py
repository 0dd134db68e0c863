"""`close_at_exit`: close what nobody closed, when the interpreter exits, newest first.

A thread that is inside native code (gloo, the c10d store, a forward pass) when the interpreter
finalizes aborts the process as it returns (it is torn down inside a C++ frame). So every live
transport is closed and every step loop stopped before that, in reverse order of creation (a step
loop stops before the transports it uses). The hook runs where concurrent.futures joins its
executors' threads, just before it (threading's own exit hooks, which precede atexit): a gRPC
handler thread streaming a transfer must be told to stop before anyone waits for it.
Objects closed earlier by their owner drop out of the registry (weak references).
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - registers its exit hook first, so ours runs before it
import itertools
import logging
import threading
import weakref
from typing import Callable

log = logging.getLogger(__name__)
_live: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
_closers: dict[int, Callable[[object], None]] = {}
_ids = itertools.count()


def close_at_exit(obj: object, close: Callable[[object], None]) -> int:
    """Call `close(obj)` at exit if `obj` is still alive and not `forget`-ed; returns its token."""
    token = next(_ids)
    _live[token] = obj
    _closers[token] = close
    return token


def forget(token: int) -> None:
    """`obj` was closed by its owner: nothing to do at exit."""
    _live.pop(token, None)
    _closers.pop(token, None)


def _close_all() -> None:
    for token in sorted(_live.keys(), reverse=True):
        obj, close = _live.get(token), _closers.pop(token, None)
        if obj is None or close is None:
            continue
        try:
            close(obj)
        except Exception:  # noqa: BLE001 - one failing close must not keep the others open
            log.exception("closing %r at exit failed", obj)


threading._register_atexit(_close_all)  # type: ignore[attr-defined]  # see the module docstring
