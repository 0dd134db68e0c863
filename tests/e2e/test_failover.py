"""Kill a decode actor while it streams: no request is lost, the tokens are still the greedy ones,
and the pool serves again afterwards (Ray restarts the actor and it rejoins)."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from pdserve.config import EngineConfig, PoolConfig, RouterConfig, ServingConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "The best way to learn is",
           "Water boils at", "import numpy as np"]
MAX_TOKENS = 40


def test_killing_a_decode_actor_mid_stream_loses_no_request(ray_cluster: None) -> None:
    from openai import OpenAI

    from pdserve import LLM, SamplingParams
    from pdserve.placement.launch import launch

    llm = LLM("smollm2-135m", num_threads=1, device="cpu")
    want = [o.text for o in llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                                    ignore_eos=True))]
    del llm
    cfg = ServingConfig(engine=EngineConfig(device="cpu"), decode=PoolConfig(instances=2), router=RouterConfig(port=0))
    deployment = launch(cfg)
    try:
        client = OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0, timeout=300)
        texts: list[str | None] = [None] * len(PROMPTS)
        errors: list[str] = []
        started = threading.Barrier(len(PROMPTS) + 1)

        def stream(i: int) -> None:
            parts = []
            try:
                chunks = client.completions.create(model=cfg.model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                                   temperature=0.0, stream=True, extra_body={"ignore_eos": True})
                for n, c in enumerate(chunks):
                    parts.append(c.choices[0].text if c.choices else "")
                    if n == 2:
                        started.wait(timeout=120)
                texts[i] = "".join(parts)
            except Exception as e:  # recorded, so the assertion below shows what the client saw
                errors.append(f"{i}: {e!r}")

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        started.wait(timeout=180)  # every stream is past its third chunk: decode is running them
        ray.kill(deployment.decode["decode-0"], no_restart=False)
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a request hung after the kill"
        assert not errors, errors  # with a second decode instance, every request completes
        assert texts == want, "a request changed its greedy tokens across the failover"

        deadline = time.monotonic() + 180
        while True:  # the restarted actor answers again, and the pool serves
            try:
                ray.get(deployment.decode["decode-0"].check_health.remote(), timeout=60)
                break
            except ray.exceptions.RayError:
                assert time.monotonic() < deadline, "the killed decode actor never came back"
                time.sleep(1)
        r = client.completions.create(model=cfg.model, prompt=PROMPTS[0], max_tokens=8, temperature=0.0)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        deployment.shutdown()
