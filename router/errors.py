"""The router's admission errors: what `Router.submit` raises when it cannot take a request now."""

from __future__ import annotations


class OverloadedError(Exception):
    """Too many requests pending; retry after `retry_after_s` (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(OverloadedError):
    """No healthy instance can take the request right now (HTTP 503)."""
