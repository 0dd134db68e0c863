"""OpenAI response bodies and SSE chunks for completions and chat, built from the router's outputs.

Extensions: the final streamed chunk (the one with `finish_reason`) carries `pdserve_timings`, the
per-request LatencyBreakdown as JSON (`timings_json`, seconds); non-streaming responses carry it
in the `x-pdserve-timings` header (`format_timings`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.router.openai_api import Kind
from pdserve.types import LatencyBreakdown

TIMINGS_HEADER = "x-pdserve-timings"
TIMINGS_FIELD = "pdserve_timings"


@dataclass
class ResponseBuilder:
    """Shapes one request's outputs as OpenAI objects; `kind` picks completions or chat."""

    kind: Kind
    request_id: str
    model: str
    num_prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, num_output: int) -> dict[str, int]:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": num_output,
                "total_tokens": self.num_prompt_tokens + num_output}

    def response(self, text: str, finish_reason: str, num_output: int) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.request_id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage(num_output)}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False,
              extra: dict[str, Any] | None = None) -> str:
        """One SSE event with one choice; `text=None` sends an empty delta (chat's final chunk)."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._event([choice], extra)

    def usage_chunk(self, num_output: int) -> str:
        return self._event([], {"usage": self.usage(num_output)})

    def _event(self, choices: list[dict[str, Any]], extra: dict[str, Any] | None) -> str:
        obj = {"id": self.request_id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
               "created": self.created, "model": self.model, "choices": choices, **(extra or {})}
        return sse(obj)


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def timings_json(latency: LatencyBreakdown | None) -> dict[str, float | str] | None:
    """The `pdserve_timings` object of a final chunk (LatencyBreakdown.to_json), None without one."""
    return None if latency is None else latency.to_json()


def format_timings(latency: LatencyBreakdown | None) -> str:
    """`queue_s=0.0012, prefill_s=0.0840, ...` for the response header (empty without a breakdown)."""
    items = (timings_json(latency) or {}).items()
    return ", ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v:.6g}" for k, v in items)
