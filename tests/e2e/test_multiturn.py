"""A 4-turn chat through the official OpenAI client against a real disaggregated deployment (local
Ray, SmolLM2) with prefix caching, KV-aware decode routing and conditional disaggregation: the same
text as the same conversation on the offline engine without any cache; from turn 2 on, prefix hits
on decode and only the delta's KV moved (a delta pull), or a local prefill of the short suffix on
the decode instance, as the decision in `pdserve_timings` says; fewer prompt tokens computed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.config import EngineConfig, RouterConfig, ServingConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "smollm2-135m"
MAX_TOKENS = 12
THRESHOLD = 48  # prompt tokens: a short follow-up's uncached suffix is prefilled on decode
LONG = ("Here is some context about the trip I am planning. I will fly from Paris to Tokyo in spring, stay "
        "two weeks, visit Kyoto and Osaka by train, and I would like to see temples, gardens and markets, "
        "eat local food, and avoid the busiest tourist spots when I can. ")
# turn 1 and turn 2 carry a long message (more than THRESHOLD uncached tokens: the prefill pool, a delta
# pull from turn 2 on), turns 3 and 4 a short one (prefilled locally on the decode instance)
MESSAGES = [LONG + "What should I pack?", LONG + "Which city should I start with?", "Thanks!", "And the food?"]


@pytest.fixture(scope="module")
def deployment(ray_cluster: None) -> Iterator[Any]:
    from pdserve.placement.launch import launch

    cfg = ServingConfig(engine=EngineConfig(device="cpu", enable_prefix_caching=True), mode="disaggregated",
                        router=RouterConfig(port=0, decode_policy="cache_aware", prefill_policy="cache_aware",
                                            pd_threshold_tokens=THRESHOLD))
    deployment = launch(cfg)
    try:
        yield deployment
    finally:
        deployment.shutdown()


def _reference() -> list[str]:
    """The conversation on the offline engine, no prefix cache: each turn's answer feeds the next."""
    from pdserve import LLM, SamplingParams

    llm = LLM(MODEL, num_threads=1, device="cpu")
    history: list[dict[str, str]] = []
    answers = []
    for message in MESSAGES:
        history.append({"role": "user", "content": message})
        (out,) = llm.chat(history, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
        answers.append(out.text)
        history.append({"role": "assistant", "content": out.text})
    return answers


def _turn(client: Any, history: list[dict[str, str]]) -> tuple[str, dict[str, Any], int]:
    """One streamed turn: its text, its pdserve_timings, its prompt tokens (usage)."""
    chunks = list(client.chat.completions.create(model=MODEL, messages=history, max_tokens=MAX_TOKENS,
                                                 temperature=0.0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    (timings,) = [c.model_extra["pdserve_timings"] for c in chunks if (c.model_extra or {}).get("pdserve_timings")]
    (usage,) = [c.usage for c in chunks if c.usage is not None]
    return text, timings, usage.prompt_tokens


def _metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_a_conversation_reuses_its_kv_and_gives_the_uncached_text(deployment: Any) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0, timeout=120)
    history: list[dict[str, str]] = []
    turns = []
    for message in MESSAGES:
        history.append({"role": "user", "content": message})
        text, timings, prompt_tokens = _turn(client, history)
        turns.append((text, timings, prompt_tokens))
        history.append({"role": "assistant", "content": text})
    assert [t[0] for t in turns] == _reference()  # greedy: the same text as without any cache

    (_, t1, n1), *later = turns
    assert (t1["pd_local"], t1["pd_reason"]) == (0.0, "long") and "pull_skipped_tokens" not in t1
    bytes_per_token = t1["transfer_bytes"] / n1  # turn 1 pulls its whole prompt
    _, t2, n2 = later[0]
    assert t2["pd_local"] == 0.0 and t2["pull_skipped_tokens"] > 0  # decode held turn 1: a delta pull
    assert t2["transfer_bytes"] < bytes_per_token * n2  # less than the whole prompt's KV: only the delta's
    assert t2["transfer_bytes"] <= bytes_per_token * (n2 - t2["pull_skipped_tokens"] + 16)  # (within a block)
    for _, t, n in later[1:]:  # a short follow-up: the decode instance prefills the suffix itself
        assert (t["pd_local"], t["pd_reason"]) == (1.0, "short") and t["pd_uncached_tokens"] <= THRESHOLD
        assert "transfer_bytes" not in t and "kv_recomputed" not in t
    computed = [n - t.get("cached_tokens", 0) for _, t, n in turns]
    assert all(c < n for c, (_, _, n) in zip(computed[1:], later))  # turn 2+: fewer prompt tokens computed
    assert all(c < computed[0] for c in computed[2:])

    url = deployment.url
    assert _metric(url, "pdserve_instance_prefix_cache_hit_tokens_total", role="decode") > 0
    assert _metric(url, "pdserve_pd_decisions_total", decision="local", reason="short") >= 2
    assert _metric(url, "pdserve_pd_local_prefill_tokens_total") > 0
    assert _metric(url, "pdserve_kv_pulls_total", outcome="recomputed") == 0
