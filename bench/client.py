"""One streaming request to an OpenAI-compatible endpoint, timed token by token at the client.

Completions (`/v1/completions`) send the prompt text; chat (`/v1/chat/completions`) sends it as
one user message. Every request asks for `max_tokens` = the workload's output length with
`ignore_eos`, streams Server-Sent Events, and asks for a final usage chunk. A completion chunk
with a choice (its text may be empty) or a chat delta with `content` is a token event; the output
token count is the server's `usage.completion_tokens` when it sends one, else the number of token
events; the server's `usage.prompt_tokens` is kept too (the prompt as it tokenized it). Any error (HTTP
status, an `error` object in the stream, a stream without `[DONE]`, a timeout, a dropped
connection) fails the request with a one-line reason; it is never raised. A server's latency
breakdown in a chunk's `pdserve_timings` object (seconds, e.g. queue / prefill / transfer) is kept.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from pdserve.bench.record import RequestRecord
from pdserve.bench.workload import WorkloadRequest

TIMINGS_FIELD = "pdserve_timings"  # pdserve's per-request breakdown, in its final chunk


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000
    path: str = "/v1/completions"
    model: str | None = None
    api_key: str | None = None

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.path

    @property
    def chat(self) -> bool:
        return "chat" in self.path

    def payload(self, req: WorkloadRequest) -> dict:
        body: dict = {"max_tokens": req.output_len, "ignore_eos": True, "temperature": 0.0,
                      "stream": True, "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        if self.chat:
            body["messages"] = ([{"role": role, "content": text} for role, text in req.messages]
                                or [{"role": "user", "content": req.prompt}])
        else:
            body["prompt"] = req.prompt
        return body

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def send_request(session: aiohttp.ClientSession, endpoint: Endpoint, req: WorkloadRequest,
                       record: RequestRecord, arrival: float, timeout_s: float) -> str:
    """Send `req` now and fill `record`; `arrival` is its scheduled perf_counter() time. Returns
    the generated text ("" for a failed request)."""
    sent = time.perf_counter()
    record.send_delay_s = sent - arrival
    text: list[str] = []
    try:
        await asyncio.wait_for(_stream(session, endpoint, req, record, sent, text), timeout_s)
    except asyncio.TimeoutError:
        _fail(record, f"timeout after {timeout_s:g}s")
    except (aiohttp.ClientError, OSError, ValueError) as e:
        _fail(record, f"{type(e).__name__}: {e}")
    return "".join(text) if record.ok else ""


async def _stream(session: aiohttp.ClientSession, endpoint: Endpoint, req: WorkloadRequest,
                  record: RequestRecord, sent: float, text: list[str]) -> None:
    async with session.post(endpoint.url, json=endpoint.payload(req), headers=endpoint.headers()) as resp:
        if resp.status != 200:
            body = (await resp.text())[:300].replace("\n", " ")
            _fail(record, f"HTTP {resp.status}: {body}")
            return
        last: float | None = None
        events, usage_tokens = 0, None
        async for raw in resp.content:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments, event names
            data = line[5:].strip()
            if data == "[DONE]":
                record.e2e_s = time.perf_counter() - sent
                record.num_output_tokens = usage_tokens if usage_tokens is not None else events
                record.ok = events > 0 or (usage_tokens or 0) > 0
                if not record.ok:
                    record.error = "stream finished without any token"
                return
            chunk = json.loads(data)
            if "error" in chunk:
                _fail(record, f"server error: {str(chunk['error'])[:300]}")
                return
            usage = chunk.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
            if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
                record.num_prompt_tokens = usage["prompt_tokens"]
            if isinstance(chunk.get(TIMINGS_FIELD), dict):
                record.server_timings = {k: float(v) for k, v in chunk[TIMINGS_FIELD].items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)}
            text.extend(_texts(chunk, endpoint.chat))
            if _has_token(chunk, endpoint.chat):
                now = time.perf_counter()
                if last is None:
                    record.ttft_s = now - sent
                else:
                    record.itl_s.append(now - last)
                last, events = now, events + 1
        _fail(record, "stream ended without [DONE]")


def _has_token(chunk: dict, chat: bool) -> bool:
    """Completions: any chunk with a choice is a token, its text may be empty (a special token,
    half of a character), as vLLM's benchmark counts them. Chat: a delta with content."""
    for choice in chunk.get("choices") or ():
        if chat:
            if (choice.get("delta") or {}).get("content"):
                return True
        elif "text" in choice:
            return True
    return False


def _texts(chunk: dict, chat: bool) -> list[str]:
    choices = chunk.get("choices") or ()
    if chat:
        return [(c.get("delta") or {}).get("content") or "" for c in choices]
    return [c.get("text") or "" for c in choices]


def _fail(record: RequestRecord, reason: str) -> None:
    record.ok, record.error = False, reason
