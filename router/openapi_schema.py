"""The JSON schemas of the two generation endpoints' request bodies, published in the server's
OpenAPI document (/openapi.json) so clients and fuzzers see what `openai_api.parse` accepts.

The routes read raw bodies (parse validates and answers OpenAI-style errors), so these schemas
document; they do not validate. Fields accepted only with their no-op value are listed with it.
"""

from __future__ import annotations

from typing import Any

_NUMBER = {"type": "number"}
_STOP = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]}
_COMMON: dict[str, Any] = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {**_NUMBER, "minimum": 0, "maximum": 2},
    "top_p": {**_NUMBER, "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "seed": {"type": "integer"},
    "stop": _STOP,
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "ignore_eos": {"type": "boolean"},
    "n": {"type": "integer", "enum": [1]},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "user": {"type": "string"},
    "presence_penalty": {**_NUMBER, "enum": [0]},
    "frequency_penalty": {**_NUMBER, "enum": [0]},
    "logit_bias": {"type": "object", "maxProperties": 0},
    "logprobs": {"type": "boolean", "enum": [False]},
}
_MESSAGE = {
    "type": "object", "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]},
    },
}
COMPLETION_BODY: dict[str, Any] = {
    "type": "object", "required": ["model", "prompt"], "additionalProperties": False,
    "properties": {**_COMMON,
                   "prompt": {"anyOf": [{"type": "string", "minLength": 1},
                                        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}]},
                   "echo": {"type": "boolean", "enum": [False]}, "best_of": {"type": "integer", "enum": [1]},
                   "suffix": {"type": "string", "enum": [""]}},
}
CHAT_BODY: dict[str, Any] = {
    "type": "object", "required": ["model", "messages"], "additionalProperties": False,
    "properties": {**_COMMON, "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
                   "max_completion_tokens": {"type": "integer", "minimum": 1},
                   "top_logprobs": {"type": "integer", "enum": [0]}},
}


def request_body(schema: dict[str, Any], models: tuple[str, ...]) -> dict[str, Any]:
    """FastAPI `openapi_extra` for a route that reads its JSON body itself; `model` lists the names
    this server answers to."""
    schema = {**schema, "properties": {**schema["properties"], "model": {"type": "string", "enum": list(models)}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
