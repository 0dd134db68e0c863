"""router/actor.py: Ray error mapping (no Ray cluster), then one real local Ray run with fake worker
actors: route, stream through the OpenAI client, kill a decode actor mid-stream, see it rejoin."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from pdserve.config import DecodePolicyName, RouterConfig, ServingConfig
from pdserve.router.actor import RouterActor, _call
from pdserve.router.errors import RequestFailedError, WorkerDeadError
from tests.router.conftest import FakeDecode, FakePrefill, expected_tokens, token_text


async def _raise(e: BaseException) -> None:
    raise e


@pytest.mark.parametrize("err", [RayActorError(), ActorDiedError(), ActorUnavailableError("gone", b"1" * 16)])
def test_actor_death_maps_to_worker_dead(err: Exception) -> None:
    with pytest.raises(WorkerDeadError, match="w1"):
        asyncio.run(_call("w1", _raise(err)))


def test_method_exception_maps_to_request_failed() -> None:
    err = RayTaskError("prefill", "Traceback ...\nValueError: prompt too long", ValueError("prompt too long"))
    with pytest.raises(RequestFailedError, match="prompt too long"):
        asyncio.run(_call("w1", _raise(err)))


def _tokenizer_dir() -> Path | None:
    root = Path(os.environ.get("PDSERVE_CACHE_DIR", Path.home() / ".cache" / "pdserve"))
    path = root / "models" / "smollm2-135m"
    return path if (path / "tokenizer.json").is_file() else None


def _wait(cond: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.mark.ray
def test_router_actor_end_to_end_with_a_decode_actor_killed(ray_cluster: None) -> None:
    import httpx
    import openai
    import ray

    tok_dir = _tokenizer_dir()
    if tok_dir is None:
        pytest.skip("the SmolLM2 tokenizer is not converted yet (run `pdserve demo` once)")
    from pdserve.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tok_dir)
    policy: DecodePolicyName = "least_kv"
    cfg = ServingConfig(router=RouterConfig(port=0, decode_policy=policy))
    prefill = ray.remote(FakePrefill).options(num_cpus=0).remote("p0")
    decodes = {f"d{i}": ray.remote(FakeDecode).options(num_cpus=0, max_restarts=1).remote(f"d{i}", delay_s=0.05)
               for i in range(2)}
    router = ray.remote(RouterActor).options(num_cpus=0).remote(cfg, str(tok_dir))
    url = ray.get(router.start.remote({"p0": prefill}, decodes), timeout=60)
    assert url.startswith("http://127.0.0.1:")
    ray.get(router.check_health.remote())

    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
    ids = tokenizer.encode("hello")
    c = oai.completions.create(model=cfg.model, prompt="hello", max_tokens=4)
    assert c.choices[0].text == "".join(token_text(t) for t in expected_tokens(ids, 4))

    stream = oai.completions.create(model=cfg.model, prompt="hello", max_tokens=30, stream=True)
    text, killed = "", None
    for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
        if killed is None and len(text.split()) >= 5:
            stats = ray.get([d.stats.remote() for d in decodes.values()])
            killed = next(s.worker_id for s in stats if s.num_running)
            ray.kill(decodes[killed], no_restart=False)  # Ray restarts it (max_restarts=1)
    assert killed is not None
    assert text == "".join(token_text(t) for t in expected_tokens(ids, 30))  # nothing lost or repeated

    def healthy_decodes() -> int:
        return httpx.get(f"{url}/health").json()["decode"]["healthy"]

    _wait(lambda: healthy_decodes() == 2)  # the restarted actor rejoined its pool
    metrics = httpx.get(f"{url}/metrics").text
    assert "pdserve_redispatched_requests_total 1.0" in metrics
    assert ray.get(router.num_pending.remote()) == 0
    ray.get(router.stop.remote())

