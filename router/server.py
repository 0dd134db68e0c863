"""The OpenAI-compatible HTTP server: FastAPI routes over a `Router`, a tokenizer and metrics.

    POST /v1/completions, /v1/chat/completions   (SSE when stream=true; first token as soon as prefill returns it)
    GET  /v1/models, /health, /metrics

Errors are OpenAI error bodies: 400 invalid input, 401 bad API key, 404 unknown model or route,
413 body too large, 429/503 overloaded (with Retry-After), 500 failed request, 504 timeout. A client
that disconnects (streaming or not) has its request aborted on every worker holding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.config import ServingConfig
from pdserve.router.core import OverloadedError, RequestStream, Router, UnavailableError
from pdserve.router.metrics import CONTENT_TYPE, RouterMetrics
from pdserve.router.errors import InvalidRequestError
from pdserve.router.openai_api import ApiError, ChatTokenizer, Kind, ModelCard, load_body, parse
from pdserve.router.openapi import MODELS_RESPONSE, deployment_shape, generation_route
from pdserve.router.responses import (SSE_DONE, TIMINGS_FIELD, TIMINGS_HEADER, ResponseBuilder, format_timings, sse,
                                      timings_json)
from pdserve.types import GenerateRequest, LatencyBreakdown, RequestId, StepOutput

MAX_BODY_BYTES = 16 << 20

log = logging.getLogger(__name__)


class _Tally:
    """One request's outputs as they stream: text, token count, metrics."""

    def __init__(self, metrics: RouterMetrics, clock: Callable[[], float], num_prompt: int) -> None:
        self.metrics, self.clock, self.num_prompt = metrics, clock, num_prompt
        self.parts: list[str] = []
        self.num_output = 0
        self.last_s: float | None = None
        self.done = False

    def add(self, out: StepOutput) -> None:
        now = self.clock()
        if out.token_ids and self.last_s is not None:
            self.metrics.observe_gap(now - self.last_s, len(out.token_ids))
        if out.token_ids:
            self.last_s = now
        self.parts.append(out.text)
        self.num_output += len(out.token_ids)
        if out.finished:
            self.finish(out.finish_reason or "error", out.latency)

    def finish(self, reason: str, latency: LatencyBreakdown | None = None) -> None:
        if not self.done:
            self.done = True
            self.metrics.observe_finish(reason, self.num_prompt, self.num_output, latency)


def build_app(router: Router, tokenizer: ChatTokenizer, cfg: ServingConfig, *, card: ModelCard | None = None,
              metrics: RouterMetrics | None = None, stats_interval_s: float = 0.5) -> FastAPI:
    """The app: generation routes, models/health/metrics, OpenAI error bodies, and a stats poll
    (every `stats_interval_s` seconds while the app runs) that keeps the router's view of its pools fresh."""
    card = card or ModelCard(cfg.model, cfg.engine.max_model_len)
    metrics = metrics or RouterMetrics(router, model_name=card.name)
    authorize = _Authorizer(cfg.router.api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_poll_stats(router, stats_interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="pdserve", lifespan=lifespan)
    app.state.router, app.state.metrics, app.state.card = router, metrics, card
    _add_error_handlers(app, metrics)
    _add_generation_routes(app, _Generation(router, tokenizer, cfg, card, metrics, authorize))
    _add_info_routes(app, router, card, deployment_shape(cfg), metrics, authorize)
    return app


class _Authorizer:
    """Checks `Authorization: Bearer <key>` when the router has an API key (constant-time compare)."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key

    def __call__(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")


class _Generation:
    """One completion or chat request: authorize, parse, submit to the router, answer (SSE or JSON)."""

    def __init__(self, router: Router, tokenizer: ChatTokenizer, cfg: ServingConfig, card: ModelCard,
                 metrics: RouterMetrics, authorize: _Authorizer) -> None:
        self.router, self.tokenizer, self.card = router, tokenizer, card
        self.metrics, self.authorize = metrics, authorize
        self.timeout_s = cfg.router.request_timeout_s

    async def __call__(self, kind: Kind, request: Request) -> Response:
        router, card = self.router, self.card
        arrival = router.clock()
        self.authorize(request)
        parsed = parse(kind, load_body(await _read_body(request)), self.tokenizer, card)
        rid = RequestId(f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}")
        stream = router.submit(GenerateRequest(rid, parsed.prompt_token_ids, parsed.sampling, arrival_s=arrival))
        builder = ResponseBuilder(kind, rid, card.name, len(parsed.prompt_token_ids))
        tally = _Tally(self.metrics, router.clock, len(parsed.prompt_token_ids))
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        if parsed.stream:
            # The background close covers a client gone before the body iteration starts (then the
            # generator's `finally` never runs); closing an already-closed stream is a no-op.
            return StreamingResponse(_events(stream, builder, tally, deadline, parsed.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(stream.aclose))
        return await _complete(request, stream, builder, tally, deadline)


def _add_error_handlers(app: FastAPI, metrics: RouterMetrics) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(OverloadedError)
    async def _overloaded(request: Request, e: OverloadedError) -> JSONResponse:
        status = 503 if isinstance(e, UnavailableError) else 429
        metrics.rejected.labels(str(status)).inc()
        err = ApiError(status, str(e), type="server_overloaded" if status == 503 else "rate_limit_exceeded")
        return JSONResponse(err.body(), status_code=status,
                            headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


def _add_generation_routes(app: FastAPI, handle: _Generation) -> None:
    @app.post("/v1/completions", **generation_route("completion"))
    async def completions(request: Request) -> Response:
        return await handle("completion", request)

    @app.post("/v1/chat/completions", **generation_route("chat"))
    async def chat_completions(request: Request) -> Response:
        return await handle("chat", request)


def _add_info_routes(app: FastAPI, router: Router, card: ModelCard, shape: dict[str, Any], metrics: RouterMetrics,
                     authorize: _Authorizer) -> None:
    @app.get("/v1/models", responses=MODELS_RESPONSE)
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "pdserve",
                 "max_model_len": card.max_model_len, "deployment": shape} for name in (card.name, *card.aliases)]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> JSONResponse:
        pools = {p.role: p.counts() for p in (router.prefill, router.decode)}  # instances per state
        ok = bool(router.decode.healthy()) and (router.mode == "colocated" or bool(router.prefill.healthy()))
        return JSONResponse({"status": "ok" if ok else "unavailable", "mode": router.mode, **pools},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


async def _poll_stats(router: Router, interval_s: float) -> None:
    while True:
        try:
            await router.refresh_stats()
        except Exception:  # a poll that fails must not stop all later ones (instances would stay dead)
            log.exception("stats poll failed")
        await asyncio.sleep(interval_s)


async def _read_body(request: Request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _next(stream: RequestStream, deadline: float) -> StepOutput | None:
    """The next output, or None at the end; raises TimeoutError past the deadline (and the router's
    stream, cancelled inside, aborts the request)."""
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(stream)
    except StopAsyncIteration:
        return None


def _failed(out: StepOutput) -> ApiError:
    return ApiError(500, out.error or "the request was aborted", type="server_error", code="request_failed")


def _invalid(e: InvalidRequestError) -> ApiError:
    return ApiError(400, f"rejected by the worker: {e}", code="invalid_for_instance")


_TIMEOUT = ApiError(504, "the request did not finish within the server's timeout", type="timeout_error", code="timeout")


async def _events(stream: RequestStream, b: ResponseBuilder, tally: _Tally, deadline: float,
                  include_usage: bool) -> AsyncIterator[str]:
    chat = b.kind == "chat"
    try:
        if chat:
            yield b.chunk("", role=True)
        while (out := await _next(stream, deadline)) is not None:
            tally.add(out)
            if out.finish_reason in ("error", "abort"):
                yield sse(_failed(out).body())
                break
            if out.finished:
                extra = {TIMINGS_FIELD: timings_json(out.latency)} | ({"usage": None} if include_usage else {})
                yield b.chunk(out.text or (None if chat else ""), out.finish_reason, extra=extra)
                if include_usage:
                    yield b.usage_chunk(tally.num_output)
                break
            if out.text or out.token_ids:  # a token without text (special, half a character) is an event too
                yield b.chunk(out.text)
    except TimeoutError:
        tally.finish("timeout")
        yield sse(_TIMEOUT.body())
    except InvalidRequestError as e:  # the status line is sent: the error event carries the 400
        tally.finish("error")
        yield sse(_invalid(e).body())
    finally:
        await stream.aclose()
        tally.finish("abort")  # a no-op unless the client went away mid-stream
    yield SSE_DONE


async def _complete(request: Request, stream: RequestStream, b: ResponseBuilder, tally: _Tally,
                    deadline: float) -> Response:
    async def collect() -> StepOutput | None:
        try:
            while (out := await _next(stream, deadline)) is not None:
                tally.add(out)
                if out.finished:
                    return out
            return None
        finally:
            await stream.aclose()

    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        gone.cancel()
    if not work.done():  # the client left: cancelling closes the stream, which aborts the request
        work.cancel()
        tally.finish("abort")
        await asyncio.wait({work})
        return Response(status_code=499)  # nobody is listening
    try:
        out = work.result()
    except TimeoutError:
        tally.finish("timeout")
        raise _TIMEOUT from None
    except InvalidRequestError as e:
        tally.finish("error")
        raise _invalid(e) from None
    if out is None or out.finish_reason in ("error", "abort"):
        raise _failed(out or StepOutput(stream.request_id, (), finish_reason="error", error="stream ended early"))
    body = b.response("".join(tally.parts), out.finish_reason or "stop", tally.num_output)
    return JSONResponse(body, headers={TIMINGS_HEADER: format_timings(out.latency)})


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
