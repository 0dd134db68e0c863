"""What the OpenAPI document (`GET /openapi.json`) declares beyond FastAPI's defaults.

The routes parse their JSON bodies themselves (openai_api.py, for OpenAI-exact errors), so FastAPI
cannot infer the schemas; they are written here: the OpenAI fields we accept, our extensions
(`ignore_eos`, `top_k`, `stop_token_ids`; the `pdserve_timings` breakdown and its header), and the
`deployment` object of `GET /v1/models` (mode, instances × tp × pp per pool, GPUs), which
`pdserve bench` reads to divide goodput per GPU.
"""

from __future__ import annotations

from typing import Any, get_args

from pdserve.config import ServingConfig
from pdserve.router.openai_api import _NO_OP, MAX_TEMPERATURE
from pdserve.router.pd_decision import PDReason

TIMINGS_KEYS = ("queue_s", "prefill_s", "transfer_s", "decode_s", "ttft_s", "e2e_s", "decode_queue_s", "kv_exposed_s")


def deployment_shape(cfg: ServingConfig) -> dict[str, Any]:
    """The pools that serve (prefill only when disaggregated) and the GPUs they occupy; on CPU,
    `num_gpus` counts engine processes (instances × tp × pp), the unit per-GPU goodput divides by."""
    pools = {"prefill": cfg.prefill, "decode": cfg.decode} if cfg.mode == "disaggregated" else {"decode": cfg.decode}
    shape: dict[str, Any] = {"mode": cfg.mode}
    for role, pool in pools.items():
        shape[role] = {"instances": pool.instances, "tp": pool.tp, "pp": pool.pp}
    shape["num_gpus"] = sum(p.instances * p.gpus_per_instance for p in pools.values())
    return shape


def _num(desc: str, **kw: Any) -> dict[str, Any]:
    return {"type": "number", "description": desc, **kw}


_SAMPLING: dict[str, Any] = {
    "model": {"type": "string", "description": "the served model's id (GET /v1/models)"},
    "max_tokens": {"type": "integer", "minimum": 1, "nullable": True,
                   "description": "default: 16 for completions, what fits the context for chat"},
    "temperature": _num("0 is greedy", minimum=0, maximum=MAX_TEMPERATURE, default=1.0),
    "top_p": _num("nucleus sampling", exclusiveMinimum=0, maximum=1, default=1.0),
    "top_k": {"type": "integer", "default": -1, "description": "extension (vLLM): -1 or 0 disables"},
    "seed": {"type": "integer", "nullable": True},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}],
             "nullable": True},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0},
                       "description": "extension (vLLM): stop at any of these token ids"},
    "ignore_eos": {"type": "boolean", "default": False,
                   "description": "extension (vLLM): keep generating past end-of-sequence (benchmarks)"},
    "n": {"type": "integer", "enum": [1]},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "user": {"type": "string"},
}
_NO_OP_FIELDS = {name: {"enum": [*values, None], "description": "accepted only with its no-op value"}
                 for name, values in _NO_OP.items()}
_COMPLETION_REQUEST = {
    "type": "object", "required": ["model", "prompt"], "additionalProperties": False,
    "properties": {**_SAMPLING, **{k: v for k, v in _NO_OP_FIELDS.items() if k != "top_logprobs"},
                   "prompt": {"oneOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "string"}, "maxItems": 1}]}},
}
_CHAT_REQUEST = {
    "type": "object", "required": ["model", "messages"], "additionalProperties": False,
    "properties": {**_SAMPLING, **{k: v for k, v in _NO_OP_FIELDS.items() if k not in ("echo", "best_of", "suffix")},
                   "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
                   "messages": {"type": "array", "minItems": 1, "items": {
                       "type": "object", "required": ["role", "content"], "properties": {
                           "role": {"type": "string",
                                    "enum": ["system", "developer", "user", "assistant", "tool"]},
                           "content": {"oneOf": [{"type": "string"}, {"type": "array"}]}}}}},
}
TIMINGS_SCHEMA = {
    "type": "object", "additionalProperties": {"type": "number"},
    "properties": {k: {"type": "number", "description": "seconds"} for k in TIMINGS_KEYS}
    | {"transfer_bytes": {"type": "number", "description": "KV bytes moved prefill -> decode"},
       "kv_recomputed": {"type": "number", "description": "1 when a failed KV pull was recomputed on decode"},
       "cached_tokens": {"type": "number", "description": "prompt tokens found in the prefix cache (not computed)"},
       "pull_skipped_tokens": {"type": "number", "description": "prompt tokens decode held, so not pulled"},
       "pd_local": {"type": "number", "description": "conditional disaggregation: 1 when the decode instance "
                                                     "prefilled the prompt itself, 0 when the prefill pool did"},
       "pd_reason": {"type": "string", "enum": [r for r in get_args(PDReason) if r != "disabled"],
                     "description": "why (router/pd_decision.py)"},
       "pd_uncached_tokens": {"type": "number", "description": "prompt tokens the decode instance did not cache"},
       "pd_prefill_queue_tokens": {"type": "number", "description": "prompt tokens queued on the least-loaded "
                                                                    "prefill instance"},
       "pd_decode_slack_tokens": {"type": "number", "description": "prompt tokens the decode instance could add "
                                                                   "to a step"}},
    "description": "extension: the request's latency breakdown, in seconds",
}
_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": True},
    "code": {"type": "string", "nullable": True}}}}}
_ERRORS = {str(code): {"description": why, "content": {"application/json": {"schema": _ERROR}}}
           for code, why in ((400, "invalid request"), (401, "bad API key"), (404, "unknown model"),
                             (429, "overloaded (Retry-After)"), (503, "unavailable (Retry-After)"),
                             (504, "timed out"))}


def generation_route(kind: str) -> dict[str, Any]:
    """`openapi_extra` and `responses` for POST /v1/completions (kind "completion") or /v1/chat/completions."""
    schema = _CHAT_REQUEST if kind == "chat" else _COMPLETION_REQUEST
    ok = {"description": "an OpenAI completion object; with stream=true, Server-Sent Events whose last "
                         "chunk (the one with finish_reason) carries `pdserve_timings`",
          "headers": {"x-pdserve-timings": {"description": "non-streaming only: `key=seconds, ...` "
                                                           "(the pdserve_timings keys)",
                                            "schema": {"type": "string"}}},
          "content": {"application/json": {"schema": {"type": "object"}},
                      "text/event-stream": {"schema": {"type": "string"}}}}
    return {"openapi_extra": {"requestBody": {"required": True,
                                              "content": {"application/json": {"schema": schema}}}},
            "responses": {"200": ok, **_ERRORS}}


MODELS_RESPONSE = {"200": {"description": "the served model; `deployment` is pdserve's extension", "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"},
            "deployment": {"type": "object", "required": ["mode", "num_gpus", "decode"], "properties": {
                "mode": {"type": "string", "enum": ["disaggregated", "colocated"]},
                "num_gpus": {"type": "integer", "description": "GPUs the pools occupy (on CPU: engine "
                                                               "processes): instances x tp x pp, summed"},
                **{role: {"type": "object", "description": f"the {role} pool" + (
                    " (absent when colocated)" if role == "prefill" else " (the only pool when colocated)"),
                    "properties": {k: {"type": "integer"} for k in ("instances", "tp", "pp")}}
                   for role in ("prefill", "decode")}}}}}}}}}}}}
