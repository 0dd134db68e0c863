"""The server on a real uvicorn (127.0.0.1) over fake workers: the official `openai` client, and
client disconnects, which only a real connection can show."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.router.conftest import LiveServer, expected_tokens, token_text
from tests.router.test_server import MODEL, make_app


def text_of(prompt: str, n: int) -> str:
    return "".join(token_text(t) for t in expected_tokens(list(prompt.encode()), n))


@pytest.fixture
def live() -> Iterator[tuple[str, Any, Any, Any]]:
    app, router, prefills, decodes = make_app()
    with LiveServer(app) as url:
        yield url, router, prefills, decodes


def wait_until(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_openai_client(live: tuple[str, Any, Any, Any]) -> None:
    url, router, _, _ = live
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    c = oai.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0,
                               extra_body={"ignore_eos": True})
    assert c.choices[0].text == text_of("hello", 5) and c.usage is not None and c.usage.completion_tokens == 5

    chunks = list(oai.completions.create(model=MODEL, prompt="hello", max_tokens=5, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text_of("hello", 5)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 10

    msgs: Any = [{"role": "user", "content": "hi"}]
    chat = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, seed=1)
    assert chat.choices[0].message.content == text_of("<user>hi\n<assistant>", 4)
    stream = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, stream=True)
    parts = [ch.choices[0].delta.content or "" for ch in stream]
    assert "".join(parts) == text_of("<user>hi\n<assistant>", 4)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="x", n=2)
    assert [m.id for m in oai.models.list()] == [MODEL]
    wait_until(lambda: not router.requests)


def test_stream_disconnect_aborts_everywhere(live: tuple[str, Any, Any, Any]) -> None:
    url, router, (p,), (d,) = live
    d.delay_s = 0.05
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 50, "stream": True}
    with httpx.Client(timeout=10) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [ln for _, ln in zip(range(6), lines, strict=False) if ln]
    assert len(got) >= 3
    wait_until(lambda: not router.requests)
    rid = d.calls[0][0].request_id
    assert d.aborted == [rid] and p.aborted == [rid]
    assert d.num_emitted < 50
    wait_until(lambda: not d.running)


def test_non_streaming_disconnect_aborts(live: tuple[str, Any, Any, Any]) -> None:
    url, router, _, (d,) = live
    d.delay_s = 0.05
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 50}
    with httpx.Client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post(f"{url}/v1/completions", json=body)
    wait_until(lambda: not router.requests)
    assert d.aborted == [d.calls[0][0].request_id]
