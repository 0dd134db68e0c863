"""`RestartingResponder`: holds the router's port while a new router starts, answering every request
503 with `Retry-After` and an OpenAI-style error body (type `server_overloaded`, code
`router_restarting`), so a client sees a server that asks it to retry rather than connection refused.

`Deployment.supervise` (what `pdserve serve` runs) opens one when the router died and closes it
just before the new router binds the port (only the bind itself is left uncovered). It can stand in
only on the machine it runs on, so only for a router there (the default: no `router.node_ip`).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

_MAX_DRAIN_BYTES = 16 << 20  # the router's own body limit: read what a client sent before answering


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= _MAX_DRAIN_BYTES:
            self.rfile.read(length)  # unread bytes would turn our answer into a connection reset
        body = json.dumps({"error": {"message": "the router is restarting; retry after the Retry-After seconds",
                                     "type": "server_overloaded", "param": None,
                                     "code": "router_restarting"}}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", str(self.server.retry_after_s))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.server.num_answered += 1

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request on stderr is noise while restarting


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    retry_after_s = 1
    num_answered = 0


class RestartingResponder:
    """503 + Retry-After on `host:port` from `open()` until `close()`. `open()` returns False (and
    logs why) when the port cannot be bound, e.g. the new router already holds it."""

    def __init__(self, host: str, port: int, retry_after_s: int = 1) -> None:
        self.host, self.port, self.retry_after_s = host, port, retry_after_s
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.num_answered = 0  # requests answered 503, over every open()

    def open(self) -> bool:
        try:
            server = _Server((self.host, self.port), _Handler)
        except OSError as e:
            log.warning("cannot answer 503 on %s:%d while the router restarts: %s", self.host, self.port, e.strerror)
            return False
        server.retry_after_s = self.retry_after_s
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="router-restarting")
        self._thread.start()
        return True

    def close(self) -> None:
        """Stop answering and release the port. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self.num_answered += server.num_answered
        if self._thread is not None:
            self._thread.join(5)
