"""Conditional disaggregation through the HTTP API (fake workers): the same responses (text, every
streamed delta, finish_reason, usage) with it on as with it off and as colocated; the decision in
`pdserve_timings` and in the x-pdserve-timings header; the decisions and local-prefill tokens in
/metrics."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pdserve.config import RouterConfig
from tests.router.test_server import MODEL, client, make_app, post, run, sse_events

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5, "temperature": 0}
COMPLETION = {"model": MODEL, "prompt": "hello world", "max_tokens": 6, "temperature": 0}
ON = RouterConfig(pd_threshold_tokens=1000)  # every prompt here is short: prefilled on decode


def _app(setup: str) -> tuple[Any, Any]:
    app, router, *_ = make_app(*{"off": ("disaggregated",), "on": ("disaggregated", ON),
                                 "colocated": ("colocated",)}[setup])
    run(router.refresh_stats())  # the decode instances' limits (the slack needs them)
    return app, router


def _responses(app: Any) -> list[Any]:
    """What a client sees of a chat and a completion, streamed and not, without ids or timings."""
    seen: list[Any] = []
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        r = run(post(app, path, body))
        assert r.status_code == 200, r.text
        seen.append((r.json()["choices"], r.json()["usage"]))
        events = sse_events(run(post(app, path, {**body, "stream": True,
                                                 "stream_options": {"include_usage": True}})).text)
        seen.append([(e["choices"], e.get("usage")) for e in events])
    return seen


def test_responses_are_the_same_on_off_and_colocated() -> None:
    results = {setup: _responses(_app(setup)[0]) for setup in ("off", "on", "colocated")}
    assert results["on"] == results["off"] == results["colocated"]


def test_the_decision_is_in_the_timings_and_the_metrics() -> None:
    app, router = _app("on")
    events = sse_events(run(post(app, "/v1/completions", {**COMPLETION, "stream": True})).text)
    (final,) = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    t = final["pdserve_timings"]
    assert (t["pd_local"], t["pd_reason"], t["pd_uncached_tokens"]) == (1.0, "short", len("hello world"))
    assert t["pd_decode_slack_tokens"] == 256 and t["pd_prefill_queue_tokens"] == 0
    header = run(post(app, "/v1/completions", COMPLETION)).headers["x-pdserve-timings"]
    assert "pd_local=1, pd_reason=short, pd_uncached_tokens=11" in header

    async def scrape() -> str:
        async with client(app) as c:
            return (await c.get("/metrics")).text

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(run(scrape())) for s in fam.samples}
    assert samples[("pdserve_pd_decisions_total", (("decision", "local"), ("reason", "short")))] == 2
    assert samples[("pdserve_pd_local_prefill_tokens_total", ())] == 2 * len("hello world")
    assert samples[("pdserve_kv_pulls_total", (("instance", "d0"), ("outcome", "recomputed")))] == 0


def test_no_decisions_when_off() -> None:
    app, _ = _app("off")
    assert run(post(app, "/v1/completions", COMPLETION)).status_code == 200

    async def scrape() -> str:
        async with client(app) as c:
            return (await c.get("/metrics")).text

    text = run(scrape())
    assert "pdserve_pd_decisions_total{" not in text and "pdserve_pd_local_prefill_tokens_total 0.0" in text
