"""OpenAI request parsing and validation: a JSON body in, a `ParsedRequest` (token ids + sampling) out.

Every way a body can be wrong raises `ApiError`, which the server turns into OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` with its HTTP status. Like OpenAI, unknown fields
are rejected by name; accepted fields we cannot honour (logprobs, penalties) are rejected unless they
carry their no-op value. Chat messages go through the model's chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pdserve.types import SamplingParams

Kind = Literal["completion", "chat"]
MAX_TEMPERATURE = 2.0  # OpenAI's bound
_ROLES = ("system", "developer", "user", "assistant", "tool")
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
           "ignore_eos", "n", "stream", "stream_options", "user", "presence_penalty", "frequency_penalty",
           "logit_bias", "logprobs"}
_FIELDS: dict[Kind, set[str]] = {
    "completion": _COMMON | {"prompt", "echo", "best_of", "suffix"},
    "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
}
_NO_OP: dict[str, tuple[Any, ...]] = {  # accepted only with these values (or null)
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False,),
    "echo": (False,), "best_of": (1,), "suffix": ("",), "top_logprobs": (0,)}


class ChatTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...


class ApiError(Exception):
    """An error answered to the client: HTTP status + OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ModelCard:
    """What the server serves: the names it answers to and the limits requests are checked against."""

    name: str
    max_model_len: int
    vocab_size: int | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParsedRequest:
    kind: Kind
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False


def load_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and an integer of over 4300 digits
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


def parse(kind: Kind, body: dict[str, Any], tokenizer: ChatTokenizer, card: ModelCard) -> ParsedRequest:
    for name in body:
        if name not in _FIELDS[kind]:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name)
    for name, ok in _NO_OP.items():
        if body.get(name) is not None and body[name] not in ok:
            raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported")
    _check_model(body, card)
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False, "stream_options.include_usage")
    where = "messages" if kind == "chat" else "prompt"
    try:
        ids = _chat_prompt(body, tokenizer) if kind == "chat" else _completion_prompt(body, tokenizer, card)
    except ValueError as e:  # the tokenizer's own checks (no chat template, a template that rejects the chat)
        raise ApiError(400, str(e), param=where) from None
    sampling = _sampling(kind, body, len(ids), card, where)
    return ParsedRequest(kind, tuple(ids), sampling, stream, include_usage)


def _check_model(body: dict[str, Any], card: ModelCard) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (a string)", param="model")
    if model not in (card.name, *card.aliases):
        raise ApiError(404, f"The model `{model}` does not exist (this server serves `{card.name}`)",
                       param="model", code="model_not_found")


def _typed(body: dict[str, Any], name: str, tp: type | tuple[type, ...], default: Any, param: str | None = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    bad_bool = isinstance(v, bool) and tp is not bool and (not isinstance(tp, tuple) or bool not in tp)
    if bad_bool or not isinstance(v, tp):
        names = "/".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))
        raise ApiError(400, f"{param or name}: expected {names}, got {json.dumps(v)[:80]}", param=param or name)
    return v


def _number(body: dict[str, Any], name: str, default: float) -> float:
    """A JSON number as a float; an integer too large for one is a 400, not an OverflowError."""
    v = _typed(body, name, (int, float), default)
    try:
        return float(v)
    except OverflowError:
        raise ApiError(400, f"{name}: out of range", param=name) from None


def _completion_prompt(body: dict[str, Any], tokenizer: ChatTokenizer, card: ModelCard) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        return tokenizer.encode(p)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        top = card.vocab_size
        bad = [t for t in p if t < 0 or (top is not None and t >= top)]
        if bad:
            raise ApiError(400, f"prompt: token id {bad[0]} is out of range [0, {top})", param="prompt")
        return list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise ApiError(400, "prompt: only one prompt per request is supported", param="prompt")
    raise ApiError(400, "prompt: expected a non-empty string or a non-empty list of token ids", param="prompt")


def _chat_prompt(body: dict[str, Any], tokenizer: ChatTokenizer) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages: expected a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(400, f"messages[{i}]: expected an object with a role in {list(_ROLES)}",
                           param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content: expected a string", param=f"messages[{i}].content")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return tokenizer.encode_chat(clean)


def _sampling(kind: Kind, body: dict[str, Any], num_prompt: int, card: ModelCard, where: str) -> SamplingParams:
    room = card.max_model_len - num_prompt
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {card.max_model_len} tokens, and your "
                       f"{where} has {num_prompt} tokens", param=where, code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, name, int, None)
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {card.max_model_len} tokens; your {where} "
                       f"has {num_prompt} tokens and {name} is {max_tokens}", param=name,
                       code="context_length_exceeded")
    if max_tokens is None:  # OpenAI: 16 for completions, as many as fit for chat
        max_tokens = min(16, room) if kind == "completion" else room
    stop = _typed(body, "stop", (str, list), ())
    temperature = _number(body, "temperature", 1.0)
    if temperature > MAX_TEMPERATURE:
        raise ApiError(400, f"temperature: must be <= {MAX_TEMPERATURE}, got {temperature}", param="temperature")
    try:
        return SamplingParams(
            temperature=temperature, top_p=_number(body, "top_p", 1.0),
            top_k=_typed(body, "top_k", int, -1), seed=_typed(body, "seed", int, None), max_tokens=max_tokens,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(_typed(body, "stop_token_ids", list, ())),
            ignore_eos=_typed(body, "ignore_eos", bool, False))
    except ValueError as e:  # SamplingParams names the field first: "top_p: must be in (0, 1]"
        field = str(e).split(":", 1)[0]
        raise ApiError(400, str(e), param=field) from None
