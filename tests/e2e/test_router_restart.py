"""Kill the router actor under load (as Ray's memory monitor or a crash does, twice): the supervisor
`pdserve serve` runs creates a new one with every worker registered, and new requests succeed within
15 s on the same URL, without restarting anything else. The router is created with small inline
arguments only (Ray warns when a restartable actor's arguments sit in the object store). A router
that cannot come back is reported, not idled on."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import ray

from pdserve.config import RouterConfig, ServingConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _complete(url: str, prompt: str, timeout_s: float = 60) -> httpx.Response:
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": 6, "temperature": 0.0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout_s)


def _serving_again(url: str, want: str, killed: float) -> float:
    """Seconds from `killed` until a request returns `want` again (60 at most)."""
    while time.monotonic() - killed < 60:
        try:
            r = _complete(url, "The capital of France is", timeout_s=10)
            if r.status_code == 200:
                assert r.json()["choices"][0]["text"] == want
                return time.monotonic() - killed
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the router did not serve again within 60 s")


def test_killed_router_serves_again_within_15_s(ray_cluster: None, capfd: pytest.CaptureFixture[str]) -> None:
    from pdserve.placement.launch import launch

    deployment = launch(ServingConfig(router=RouterConfig(port=_free_port())))
    assert "constructor arguments in the object store" not in capfd.readouterr().err  # ray#53727
    stop, load_stop = threading.Event(), threading.Event()
    supervisor = threading.Thread(target=deployment.supervise, args=(stop,), kwargs={"poll_s": 0.5}, daemon=True)
    supervisor.start()
    want = _complete(deployment.url, "The capital of France is").json()["choices"][0]["text"]
    outcomes: list[tuple[float, bool]] = []
    refusals: list[httpx.Response] = []  # answers other than 200: each must be a 503 asking to retry

    def load() -> None:
        while not load_stop.is_set():
            try:
                r = _complete(deployment.url, "The capital of France is", timeout_s=30)
                ok = r.status_code == 200
                refusals.extend([] if ok else [r])
            except httpx.HTTPError:  # a stream the killed router cut, or its port not yet held again
                ok = False
            outcomes.append((time.monotonic(), ok))
            if not ok:
                time.sleep(0.5)  # the router is down: do not spin a core the restart needs

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(3)
        for no_restart in (False, True):  # as `ray.kill` does by hand, then as the memory monitor or a crash
            killed = time.monotonic()
            ray.kill(deployment.router, no_restart=no_restart)
            back_s = _serving_again(deployment.url, want, killed)
            assert back_s < 15, f"serving again after {back_s:.1f} s"
            print(f"router killed under load (no_restart={no_restart}): serving again after {back_s:.1f} s")
        back = time.monotonic()
        load_stop.set()
        for t in threads:
            t.join(60)
        assert any(ok and at > back for at, ok in outcomes) or _complete(deployment.url, "hi").status_code == 200
        health = httpx.get(f"{deployment.url}/health", timeout=10).json()
        whole = {"healthy": 1, "unavailable": 0, "dead": 0, "total": 1}
        # every instance re-registered
        assert health["status"] == "ok" and health["prefill"] == whole and health["decode"] == whole, health
        assert ray.get(deployment.router.num_pending.remote(), timeout=10) == 0
        assert deployment.num_router_restarts == 2
        assert all(r.status_code == 503 and "retry-after" in r.headers for r in refusals), \
            [(r.status_code, r.text) for r in refusals]
    finally:
        load_stop.set()
        stop.set()
        supervisor.join(10)
        deployment.shutdown()


def test_unrecoverable_router_is_reported(ray_cluster: None) -> None:
    from pdserve.placement.launch import Deployment
    from pdserve.router.actor import RouterActor

    cfg = ServingConfig(mode="colocated", router=RouterConfig(port=0))
    router = ray.remote(RouterActor).options(num_cpus=0).remote(cfg)
    ray.kill(router, no_restart=True)
    t0 = time.monotonic()
    failure = Deployment("http://unused", router).supervise(threading.Event(), give_up_s=2.0, poll_s=0.2)
    assert failure is not None and "has not served for 2 s" in failure
    assert time.monotonic() - t0 < 20
