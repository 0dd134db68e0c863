"""What tools written for vLLM and OpenAI read from pdserve: vLLM's metric names and labels, the
deployment's shape at /v1/models, and an OpenAPI document that declares our extensions."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.config import PoolConfig, ServingConfig
from pdserve.router.openapi import deployment_shape
from tests.router.test_server import MODEL, client, make_app, post, run

OK = {"model": MODEL, "prompt": "hello", "temperature": 0}


def _get(app: Any, path: str) -> httpx.Response:
    async def go() -> httpx.Response:
        await app.state.router.refresh_stats()
        async with client(app) as c:
            return await c.get(path)
    return run(go())


def _samples(app: Any) -> dict[tuple[str, tuple], float]:
    text = _get(app, "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_vllm_named_series_count_what_pdserve_series_count() -> None:
    app, *_ = make_app()
    for _ in range(3):
        assert run(post(app, "/v1/completions", {**OK, "max_tokens": 4})).status_code == 200
    s = _samples(app)
    m = (("model_name", MODEL),)
    assert s[("vllm:time_to_first_token_seconds_count", m)] == s[("pdserve_time_to_first_token_seconds_count", ())] == 3
    assert s[("vllm:e2e_request_latency_seconds_count", m)] == 3
    assert s[("vllm:inter_token_latency_seconds_count", m)] == s[("pdserve_inter_token_latency_seconds_count", ())] == 9
    assert s[("vllm:time_per_output_token_seconds_count", m)] == 9
    assert s[("vllm:request_time_per_output_token_seconds_count", m)] == 3
    assert s[("vllm:request_queue_time_seconds_count", m)] == 3
    assert s[("vllm:generation_tokens_total", m)] == s[("pdserve_generation_tokens_total", ())] == 12
    assert s[("vllm:prompt_tokens_total", m)] == s[("pdserve_prompt_tokens_total", ())] == 15
    assert s[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", MODEL)))] == 3
    assert s[("pdserve_phase_queue_time_seconds_count", (("phase", "prefill"),))] == 3
    assert s[("pdserve_phase_queue_time_seconds_count", (("phase", "decode"),))] == 3  # every request was pulled
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        engines = {dict(labels)["engine"] for name, labels in s if name == gauge}
        assert engines == {"p0", "d0"}, gauge


@pytest.mark.parametrize("mode, num_gpus", [("disaggregated", 2 * 1 + 3 * 2), ("colocated", 3 * 2)])
def test_models_carry_the_deployment_shape(mode: str, num_gpus: int) -> None:
    cfg = ServingConfig(mode=mode, prefill=PoolConfig(instances=2), decode=PoolConfig(instances=3, tp=2))  # type: ignore[arg-type]
    shape = deployment_shape(cfg)
    assert shape["mode"] == mode and shape["num_gpus"] == num_gpus
    assert shape["decode"] == {"instances": 3, "tp": 2, "pp": 1} and ("prefill" in shape) == (mode == "disaggregated")
    app, *_ = make_app(mode)
    card = _get(app, "/v1/models").json()["data"][0]
    assert card["deployment"]["mode"] == mode and card["deployment"]["num_gpus"] == (2 if mode == "disaggregated" else 1)


def test_openapi_declares_the_extensions() -> None:
    app, *_ = make_app()
    doc = _get(app, "/openapi.json").json()
    completion = doc["paths"]["/v1/completions"]["post"]
    body = completion["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"ignore_eos", "top_k", "stop_token_ids", "prompt", "max_tokens"} <= set(body)
    assert "x-pdserve-timings" in completion["responses"]["200"]["headers"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"messages", "ignore_eos", "max_completion_tokens"} <= set(chat["properties"])
    models = doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert "deployment" in models["properties"]["data"]["items"]["properties"]
    # The schema accepts what the server accepts: every field the parser knows is declared.
    from pdserve.router.openai_api import _FIELDS
    assert _FIELDS["completion"] == set(body) and _FIELDS["chat"] == set(chat["properties"])


DASHBOARD = Path(__file__).resolve().parents[2] / "router" / "dashboards" / "pdserve.json"


def dashboard_metrics(path: Path = DASHBOARD) -> set[str]:
    """Every metric name the dashboard's PromQL queries read."""
    doc = json.loads(path.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return {name for e in exprs for name in re.findall(r"\b(?:vllm:|pdserve_)[a-zA-Z0-9_:]+", e)}


def exported_metrics(text: str) -> set[str]:
    """Every series name a /metrics page can answer, a family that has no sample yet included."""
    names = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        names |= {fam.name + suffix for suffix in {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
                  .get(fam.type, ("",))}
    return names


def test_the_grafana_dashboard_queries_only_exported_metrics() -> None:
    app, *_ = make_app()
    assert run(post(app, "/v1/completions", {**OK, "max_tokens": 4})).status_code == 200
    wanted = dashboard_metrics()
    assert len(wanted) >= 15 and any(n.startswith("vllm:") for n in wanted)
    assert wanted - exported_metrics(_get(app, "/metrics").text) == set()
