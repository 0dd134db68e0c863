"""The HTTP server over fake workers, in-process through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.config import EngineConfig, RouterConfig, ServingConfig
from pdserve.router.openai_api import ModelCard
from pdserve.router.server import build_app
from tests.router.conftest import FakeTokenizer, expected_tokens, make_router, token_text

T = TypeVar("T")
MODEL = "tiny"
CTX = 64


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


def make_app(mode: str = "disaggregated", router_cfg: RouterConfig | None = None, **kw: Any) -> tuple[Any, ...]:
    cfg = ServingConfig(model=MODEL, mode=mode,  # type: ignore[arg-type]
                        engine=EngineConfig(device="cpu", max_model_len=CTX),
                        router=router_cfg or RouterConfig())
    router, prefills, decodes = make_router(mode, cfg=cfg.router, **kw)
    app = build_app(router, FakeTokenizer(), cfg, card=ModelCard(MODEL, CTX, vocab_size=256))
    return app, router, prefills, decodes


def client(app: Any, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers)


async def post(app: Any, path: str, body: Any, **headers: str) -> httpx.Response:
    async with client(app, **headers) as c:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await c.post(path, content=content, headers={"content-type": "application/json"})


def text_of(prompt: str, n: int) -> str:
    return "".join(token_text(t) for t in expected_tokens(list(prompt.encode()), n))


def sse_events(body: str) -> list[Any]:
    lines = [ln[len("data: "):] for ln in body.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_completion() -> None:
    app, *_ = make_app()
    r = run(post(app, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 5, "temperature": 0}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == text_of("hello", 5) and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    timings = dict(kv.split("=") for kv in r.headers["x-pdserve-timings"].split(", "))
    assert set(timings) >= {"queue_s", "prefill_s", "transfer_s", "decode_s", "ttft_s", "e2e_s"}


def test_completion_token_ids_and_default_max_tokens() -> None:
    app, _, _, (d,) = make_app("colocated")
    r = run(post(app, "/v1/completions", {"model": MODEL, "prompt": [104, 105]}))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default for completions
    assert d.calls[0][0].prompt_token_ids == (104, 105)


def test_chat_uses_the_template_and_fills_the_context_by_default() -> None:
    app, _, _, (d,) = make_app()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = run(post(app, "/v1/chat/completions", {"model": MODEL, "messages": msgs}))
    assert r.status_code == 200, r.text
    prompt = "<system>be brief\n<user>hi\n<assistant>"
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text_of(prompt, CTX - len(prompt))}
    assert d.calls[0][0].sampling.max_tokens == CTX - len(prompt)


def test_stream_completion_with_usage_and_timings() -> None:
    app, *_ = make_app()
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    r = run(post(app, "/v1/completions", body))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == text_of("abc", 4)
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert finals[0]["pdserve_timings"]["e2e_s"] >= finals[0]["pdserve_timings"]["ttft_s"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_stream_chat() -> None:
    app, *_ = make_app("colocated")
    r = run(post(app, "/v1/chat/completions",
                 {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}))
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["object"] == "chat.completion.chunk"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert content == text_of("<user>x\n<assistant>", 3)
    assert events[-1]["choices"][0]["finish_reason"] == "length" and "pdserve_timings" in events[-1]


OK = {"model": MODEL, "prompt": "hi"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {**OK, "model": "gpt-9"}, 404, "model"),
    ("/v1/completions", {**OK, "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {**OK, "n": 2}, 400, "n"),
    ("/v1/completions", {**OK, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**OK, "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**OK, "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": CTX}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "seed": "x"}, 400, "seed"),
    ("/v1/completions", {**OK, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {**OK, "stop": 5}, 400, "stop"),
    ("/v1/completions", {**OK, "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("/v1/completions", {**OK, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {**OK, "logprobs": 5}, 400, "logprobs"),
    ("/v1/completions", {**OK, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {**OK, "prompt": "x" * CTX}, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": [1, 999]}, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": [1, -1]}, 400, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "prompt": "hi"}, 400, "prompt"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_openai_error(path: str, body: Any, status: int, param: str | None) -> None:
    app, router, _, (d,) = make_app()
    r = run(post(app, path, body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert not d.calls and not router.requests


def test_api_key() -> None:
    app, *_ = make_app(router_cfg=RouterConfig(api_key="s3cret"))
    assert run(post(app, "/v1/completions", OK)).status_code == 401
    r = run(post(app, "/v1/completions", OK, authorization="Bearer nope"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert run(post(app, "/v1/completions", OK, authorization="Bearer s3cret")).status_code == 200

    async def models(**h: str) -> int:
        async with client(app, **h) as c:
            return (await c.get("/v1/models")).status_code

    assert run(models()) == 401 and run(models(authorization="Bearer s3cret")) == 200


def test_overload_is_429_with_retry_after() -> None:
    app, router, _, (d,) = make_app(router_cfg=RouterConfig(max_pending_requests=1))
    d.delay_s = 0.05

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        first = asyncio.create_task(post(app, "/v1/completions", {**OK, "max_tokens": 4}))
        while not router.requests:
            await asyncio.sleep(0.005)
        second = await post(app, "/v1/completions", OK)
        return await first, second

    first, second = run(scenario())
    assert first.status_code == 200
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert second.json()["error"]["type"] == "rate_limit_exceeded"


def test_no_healthy_instance_is_503_and_health_says_so() -> None:
    app, router, _, (d,) = make_app()

    async def health() -> httpx.Response:
        async with client(app) as c:
            return await c.get("/health")

    assert run(health()).status_code == 200
    d.kill()
    run(router.refresh_stats())
    r = run(post(app, "/v1/completions", OK))
    assert r.status_code == 503 and "retry-after" in r.headers
    h = run(health())
    assert h.status_code == 503 and h.json()["decode"] == {"healthy": 0, "unavailable": 0, "dead": 1, "total": 1}


def test_timeout_is_504_and_aborts() -> None:
    app, router, (p,), _ = make_app(router_cfg=RouterConfig(request_timeout_s=0.2))
    p.hang = True
    r = run(post(app, "/v1/completions", OK))
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert p.aborted == [p.calls[0].request_id] and not router.requests


def test_worker_failure_is_500_and_error_event_when_streaming() -> None:
    app, _, _, (d,) = make_app()
    d.fail_requests = True
    r = run(post(app, "/v1/completions", OK))
    assert r.status_code == 500 and "bad request" in r.json()["error"]["message"]
    r = run(post(app, "/v1/completions", {**OK, "stream": True}))
    events = sse_events(r.text)
    assert "error" in events[-1] and r.text.endswith("data: [DONE]\n\n")


def test_models_and_unknown_route() -> None:
    app, *_ = make_app()

    async def get(path: str) -> httpx.Response:
        async with client(app) as c:
            return await c.get(path)

    assert [m["id"] for m in run(get("/v1/models")).json()["data"]] == [MODEL]
    r = run(get("/v1/nothing"))
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_parse_and_count() -> None:
    app, router, *_ = make_app()
    for _ in range(3):
        assert run(post(app, "/v1/completions", {**OK, "max_tokens": 4})).status_code == 200
    run(post(app, "/v1/completions", {**OK, "n": 3}))

    async def scrape() -> str:
        await router.refresh_stats()
        async with client(app) as c:
            return (await c.get("/metrics")).text

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(run(scrape())) for s in fam.samples}
    assert samples[("pdserve_requests_total", (("finish_reason", "length"),))] == 3
    assert samples[("pdserve_time_to_first_token_seconds_count", ())] == 3
    assert samples[("pdserve_inter_token_latency_seconds_count", ())] == 9
    assert samples[("pdserve_kv_transfer_time_seconds_count", ())] == 3
    assert samples[("pdserve_kv_transfer_bytes_total", ())] == 3 * 4096
    assert samples[("pdserve_generation_tokens_total", ())] == 12
    assert samples[("pdserve_instance_healthy", (("instance", "d0"), ("role", "decode")))] == 1
    assert ("pdserve_instance_kv_usage_ratio", (("instance", "p0"), ("role", "prefill"))) in samples
    assert samples[("pdserve_pending_requests", ())] == 0


def test_stream_sends_an_event_for_a_token_without_text(monkeypatch) -> None:
    """A token whose text is empty (a special token skipped in the text, half a character) still
    reaches the client as its own event: time to first token is the first token's time."""
    import tests.router.conftest as fakes

    monkeypatch.setattr(fakes, "token_text", lambda t: "")
    app, *_ = make_app()
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 4, "stream": True}
    events = [e for e in sse_events(run(post(app, "/v1/completions", body)).text) if e["choices"]]
    assert len(events) == 4 and all(e["choices"][0]["text"] == "" for e in events)


def test_metrics_expose_prefix_cache_and_kernel_fallback_counters() -> None:
    import dataclasses

    app, router, *_ = make_app()

    async def scrape() -> str:
        await router.refresh_stats()
        inst = router.decode.instances["d0"]
        inst.stats = dataclasses.replace(inst.stats, prefix_cache_queried_tokens=96, prefix_cache_hit_tokens=64,
                                         num_fallback_steps=3)
        async with client(app) as c:
            return (await c.get("/metrics")).text

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(run(scrape())) for s in fam.samples}
    d0, p0 = (("instance", "d0"), ("role", "decode")), (("instance", "p0"), ("role", "prefill"))
    assert samples[("pdserve_instance_prefix_cache_queried_tokens_total", d0)] == 96
    assert samples[("pdserve_instance_prefix_cache_hit_tokens_total", d0)] == 64
    assert samples[("pdserve_instance_engine_fallback_steps_total", d0)] == 3
    assert samples[("pdserve_instance_prefix_cache_hit_tokens_total", p0)] == 0
