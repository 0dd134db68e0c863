"""The stand-in that holds a dead router's port while a new one starts: every request gets 503 with
Retry-After and an OpenAI-style error body; closing it frees the port for the new router."""

from __future__ import annotations

import socket

import httpx

from pdserve.placement.restarting import RestartingResponder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_answers_503_with_retry_after_then_frees_the_port() -> None:
    port = _free_port()
    stand_in = RestartingResponder("127.0.0.1", port, retry_after_s=2)
    assert stand_in.open()
    try:
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x" * 100_000}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "router_restarting" and r.json()["error"]["type"] == "server_overloaded"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503
        assert not RestartingResponder("127.0.0.1", port).open()  # the port is held
    finally:
        stand_in.close()
    stand_in.close()  # idempotent
    assert stand_in.num_answered == 2
    with socket.socket() as s:  # the new router can bind it now (as uvicorn does: SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
