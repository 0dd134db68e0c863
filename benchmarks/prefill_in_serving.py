"""One prefill batch as the serving path runs it, against the same batch in-process: the default
disaggregated deployment prefills two prompts of 399 and 498 tokens (one batch) alone, then
while 6 long generations keep the decode actor busy, and the same shape runs through a bare engine
in this process afterwards. Times are the prefill worker's own `prefill_s`.

    python benchmarks/prefill_in_serving.py     # ~2 min
"""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp

LENS = (399, 498)
MODEL = "smollm2-135m"


async def _request(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True}
    timings: dict = {}
    async with session.post(url + "/v1/completions", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data:") and b"[DONE]" not in line:
                timings = json.loads(line[5:]).get("pdserve_timings") or timings
    return timings


async def _batch(session: aiohttp.ClientSession, url: str) -> list[int]:
    prompts = [[(7 * j + i) % 40000 + 100 for j in range(n)] for i, n in enumerate(LENS)]
    timings = await asyncio.gather(*(_request(session, url, p, 2) for p in prompts))
    return [round(1e3 * t["prefill_s"]) for t in timings]


async def _serving() -> None:
    import ray

    from pdserve.config import EngineConfig, RouterConfig, ServingConfig
    from pdserve.placement.launch import launch

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    deployment = launch(ServingConfig(engine=EngineConfig(num_threads=1), router=RouterConfig(port=0)))
    try:
        async with aiohttp.ClientSession() as session:
            await _request(session, deployment.url, [5, 6, 7], 2)  # warm-up
            for _ in range(2):
                print(f"serving, decode idle:  prefill_s {await _batch(session, deployment.url)} ms", flush=True)
            busy = [asyncio.create_task(_request(session, deployment.url, [11 + i, 12, 13], 400)) for i in range(6)]
            await asyncio.sleep(3)
            for _ in range(2):
                print(f"serving, decode busy:  prefill_s {await _batch(session, deployment.url)} ms", flush=True)
            for task in busy:
                task.cancel()
    finally:
        deployment.shutdown()
        ray.shutdown()


def _in_process() -> None:
    import torch

    from pdserve.config import EngineConfig
    from pdserve.engine.engine import Engine
    from pdserve.engine.profiling import time_prefill

    torch.set_num_threads(1)
    engine = Engine.from_config(MODEL, EngineConfig(max_model_len=1025))
    print(f"in-process engine:     {round(1e3 * time_prefill(engine, list(LENS), 2))} ms (one batch)", flush=True)


if __name__ == "__main__":
    asyncio.run(_serving())
    _in_process()
