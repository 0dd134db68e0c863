"""The two kinds of failure at the router <-> worker boundary (as vLLM's `EngineGenerateError` vs
`EngineDeadError`), raised by `PrefillClient` / `DecodeClient` calls.

`RequestFailedError`: this request failed, the instance is fine (`InvalidRequestError` when the
instance rejected it as invalid: HTTP 400). `WorkerDeadError`: the instance is gone, re-dispatch
everything it held. Its subclass `WorkerUnavailableError` says the instance did not answer but is not
known to be dead: the call's requests are re-dispatched the same way, and the instance stays
registered as unavailable (out of dispatch) until it answers again.

And the router's own admission errors, what `Router.submit` raises when it cannot take a request
now: `OverloadedError` (HTTP 429) and `UnavailableError` (HTTP 503).
"""

from __future__ import annotations


class WorkerDeadError(Exception):
    """The instance died or became unreachable; nothing it held survives."""

    def __init__(self, worker_id: str, reason: str = "") -> None:
        super().__init__(f"worker {worker_id} is dead" + (f": {reason}" if reason else ""))
        self.worker_id = worker_id


class WorkerUnavailableError(WorkerDeadError):
    """The instance is unreachable for now (its node is partitioned, or it is restarting): the call's
    outcome is unknown, so what it held is re-dispatched, but the instance is not counted dead."""

    def __init__(self, worker_id: str, reason: str = "") -> None:
        Exception.__init__(self, f"worker {worker_id} is unavailable" + (f": {reason}" if reason else ""))
        self.worker_id = worker_id


class RequestFailedError(Exception):
    """One request failed on a live instance with an internal error (HTTP 5xx)."""


class InvalidRequestError(RequestFailedError):
    """The instance rejected the request as invalid for it (its prompt cannot fit this instance's KV
    cache, ...): the client's fault, HTTP 400. Raised from the router's stream as it is."""


class OverloadedError(Exception):
    """Too many requests pending; retry after `retry_after_s` (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(OverloadedError):
    """No healthy instance can take the request right now (HTTP 503)."""
