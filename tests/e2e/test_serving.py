"""Whole system: a real local Ray cluster, real SmolLM2 workers, a real HTTP server, the official
OpenAI client. Tokens must equal the offline engine's, in both modes, streamed or not."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.config import EngineConfig, RouterConfig, ServingConfig
from pdserve.placement.steps import step_kind

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    from pdserve import LLM, SamplingParams

    llm = LLM("smollm2-135m", num_threads=1, device="cpu")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return {p: o.token_ids for p, o in zip(PROMPTS, outs)}


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def deployment(request: pytest.FixtureRequest, ray_cluster: None) -> Iterator[Any]:
    from pdserve.placement.launch import launch

    cfg = ServingConfig(engine=EngineConfig(device="cpu"), mode=request.param, router=RouterConfig(port=0))
    deployment = launch(cfg)
    try:
        yield deployment
    finally:
        deployment.shutdown()


@pytest.fixture(scope="module")
def served(deployment: Any) -> tuple[str, str]:
    return ("disaggregated" if deployment.prefill else "colocated"), deployment.url


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)




def test_openai_client_gets_the_offline_engine_tokens(served: tuple[str, str], reference: dict[str, list[int]]) -> None:
    from pdserve.models import resolve_model
    from pdserve.tokenizer import Tokenizer

    mode, url = served
    tok = Tokenizer.from_dir(resolve_model("smollm2-135m"))
    client = _client(url)
    for prompt in PROMPTS:
        want = tok.decode(reference[prompt])
        resp = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0.0, extra_body={"ignore_eos": True})
        assert resp.choices[0].text == want, f"{mode}, non-streaming"
        assert resp.usage.completion_tokens == MAX_TOKENS
        chunks = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0.0, stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want, f"{mode}, streaming"


def test_concurrent_requests_complete_and_metrics_count_them(served: tuple[str, str]) -> None:
    mode, url = served
    client = _client(url)
    before = _counter(url, "pdserve_requests")

    def one(i: int) -> str:
        r = client.chat.completions.create(model="smollm2-135m", max_tokens=12, temperature=0.0,
                                           messages=[{"role": "user", "content": f"Count to {i}."}])
        return r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(one, range(16)))
    assert all(r in ("stop", "length") for r in reasons), reasons
    assert _counter(url, "pdserve_requests") - before >= 16
    assert _counter(url, "pdserve_instance_engine_steps") > 0  # the workers' own step counters reach /metrics


def test_step_logs_hold_every_step_the_instances_ran(deployment: Any) -> None:
    """What an in-situ profile is fitted to: each instance's engine steps, polled incrementally."""
    before = deployment.step_logs()
    cursor = {w: first + len(steps) for w, (first, steps) in before.items()}
    client = _client(deployment.url)
    prompt = "The capital of France is"
    client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=5, temperature=0.0,
                              extra_body={"ignore_eos": True})
    after = deployment.step_logs(cursor)
    assert set(after) == set(before) == {*deployment.prefill, *deployment.decode}
    new = [s for first, steps in after.values() for s in steps]
    assert all(first == cursor[w] for w, (first, _) in after.items())  # nothing dropped, nothing repeated
    kinds = [step_kind(s) for s in new]
    # one prompt prefilled once (here or on the prefill instance), then 4 decode steps of one sequence
    assert kinds.count("prefill") == 1 and kinds.count("decode") == 4 and len(new) == 5
    (pre,) = [s for s, k in zip(new, kinds) if k == "prefill"]
    assert pre.cached_tokens == (0,) and pre.new_tokens[0] > 3
    assert all(s.duration_s > 0 for s in new)


def test_bad_inputs_get_4xx_with_openai_error_bodies(served: tuple[str, str]) -> None:
    _, url = served
    cases = [
        ({"model": "smollm2-135m", "prompt": "hi", "max_tokens": -1}, 400),
        ({"model": "smollm2-135m", "prompt": "hi", "temperature": "hot"}, 400),
        ({"model": "no-such-model", "prompt": "hi"}, 404),
        ({"model": "smollm2-135m", "prompt": "word " * 5000}, 400),
        ({"model": "smollm2-135m", "prompt": "hi", "n": 3}, 400),
    ]
    for body, status in cases:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()["error"]) >= {"message", "type"}
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert httpx.get(f"{url}/health").status_code == 200


def test_extreme_sampling_values_get_200_or_400_and_no_worker_restarts(served: tuple[str, str]) -> None:
    """Valid but extreme sampling values never crash a worker (a NaN there once took the pool down)."""
    _, url = served
    failures = _counter(url, "pdserve_worker_failures") + _counter(url, "pdserve_redispatched_requests")
    extremes = [{"temperature": 1e-30}, {"temperature": 1e-6, "seed": 7}, {"temperature": 5e-324},
                {"temperature": 1e30}, {"temperature": 2.0, "top_p": 1e-300}, {"top_k": 2**62, "top_p": 1e-9},
                {"temperature": 1e-30, "top_p": 1e-30, "top_k": 1, "seed": 2**62}, {"temperature": 1e308},
                {"temperature": "1e-30"}, {"top_p": 0}, {"temperature": -1e-30}, {"seed": -5}]
    for extra in extremes:
        body = {"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 4, **extra}
        for stream in (False, True):
            r = httpx.post(f"{url}/v1/completions", json={**body, "stream": stream}, timeout=60)
            assert r.status_code in (200, 400), (extra, r.status_code, r.text)
            if r.status_code == 400:
                assert set(r.json()["error"]) >= {"message", "type"}
            else:
                assert '"error"' not in r.text, (extra, r.text)
    assert httpx.get(f"{url}/health").status_code == 200
    after = _counter(url, "pdserve_worker_failures") + _counter(url, "pdserve_redispatched_requests")
    assert after == failures, "a worker died (or a request was moved) on valid sampling values"
    assert _counter(url, "pdserve_poison_requests") == 0


def _counter(url: str, prefix: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name.startswith(prefix):
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total
