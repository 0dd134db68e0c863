"""The Ray shell of the router: `RouterActor` serves the OpenAI API with uvicorn on its own event loop,
and `RayPrefillClient`/`RayDecodeClient` adapt worker actor handles to the client protocols.

This is the router's only Ray import. Ray's errors map onto the protocol's: `ActorUnavailableError`
(the actor's node is unreachable for now, or the actor is restarting) becomes
`WorkerUnavailableError`; the other actor errors (`ActorDiedError`: the actor or its node died) and a
lost object become `WorkerDeadError`; an exception raised inside a worker method becomes
`RequestFailedError` (`InvalidRequestError` for a `ValueError`). Every call is awaited on the
actor's event loop (no `ray.get`), so thousands of requests stream concurrently.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import ray
import uvicorn
from ray.exceptions import (
    ActorUnavailableError,
    ObjectLostError,
    RayActorError,
    RaySystemError,
    RayTaskError,
    TaskCancelledError,
)

from pdserve import faultpoints
from pdserve.config import ServingConfig
from pdserve.router.core import Router
from pdserve.router.openai_api import ModelCard
from pdserve.router.errors import InvalidRequestError, RequestFailedError, WorkerDeadError, WorkerUnavailableError
from pdserve.router.server import build_app
from pdserve.types import GenerateRequest, PrefillResult, RequestId, StepOutput, WorkerStats

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from pdserve.kvtransfer.types import KVHandle

log = logging.getLogger(__name__)
T = TypeVar("T")
_DEAD = (RayActorError, ObjectLostError, RaySystemError)  # ActorUnavailableError is a RayActorError


def worker_error(worker_id: str, e: Exception) -> WorkerDeadError:
    """The protocol error for Ray error `e` (one of `_DEAD`) on `worker_id`'s actor."""
    if isinstance(e, ActorUnavailableError):
        return WorkerUnavailableError(worker_id, type(e).__name__)
    return WorkerDeadError(worker_id, type(e).__name__)


async def _call(worker_id: str, ref: Awaitable[T]) -> T:
    try:
        return await ref
    except _DEAD as e:
        raise worker_error(worker_id, e) from e
    except (RayTaskError, TaskCancelledError) as e:
        cause = getattr(e, "cause", None)
        message = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).strip().splitlines()[-1]
        # a worker's ValueError (the request is invalid there) comes as a RayTaskError that is also one
        raise (InvalidRequestError if isinstance(e, ValueError) else RequestFailedError)(message) from e


async def _items(worker_id: str, method: Any, *args: Any) -> AsyncGenerator[Any, None]:
    """The items of a streaming-generator actor method called with `args`, with `_call`'s errors."""
    try:
        stream: Any = method.options(num_returns="streaming").remote(*args)
        async for ref in stream:
            yield await _call(worker_id, ref)
    except _DEAD as e:  # raised by the stream itself, between items
        raise worker_error(worker_id, e) from e


def worker_actor_name(worker_id: str) -> str:
    """The Ray actor name of a worker instance's entry rank (launch names them so)."""
    return f"pdserve-{worker_id}"


def _named_actors(worker_ids: Sequence[str]) -> dict[str, ActorHandle[Any]]:
    """The live worker actors by id. One killed for good (a multi-rank instance does not restart)
    is left out with a warning, as a dead instance is marked dead in its pool: the router serves on
    with the rest. ValueError only when none of `worker_ids` is left."""
    found: dict[str, ActorHandle[Any]] = {}
    for wid in worker_ids:
        try:
            found[wid] = ray.get_actor(worker_actor_name(wid))
        except ValueError:  # ray.get_actor: no such actor
            log.warning("router: worker %s is gone for good; serving without it", wid)
    if worker_ids and not found:
        raise ValueError(f"router: every worker of {list(worker_ids)} is gone")
    return found


class RayPrefillClient:
    def __init__(self, worker_id: str, actor: ActorHandle[Any]) -> None:
        self.worker_id, self.actor = worker_id, actor

    async def prefill(self, req: GenerateRequest) -> PrefillResult:
        await faultpoints.areached("router.queued", (req,))  # chaos windows: no-ops unless armed
        result: PrefillResult = await _call(self.worker_id, self.actor.prefill.remote(req))
        if result.handle is not None:
            await faultpoints.areached("router.prefilled", (req,))
        return result

    async def prefill_stream(self, req: GenerateRequest) -> AsyncGenerator[KVHandle | PrefillResult, None]:
        await faultpoints.areached("router.queued", (req,))
        async for item in _items(self.worker_id, self.actor.prefill_stream, req):
            if isinstance(item, PrefillResult) and item.handle is not None:
                await faultpoints.areached("router.prefilled", (req,))
            yield item

    async def abort(self, request_id: RequestId) -> None:
        await _call(self.worker_id, self.actor.abort.remote(request_id))

    async def stats(self) -> WorkerStats:
        return await _call(self.worker_id, self.actor.stats.remote())


class RayDecodeClient:
    def __init__(self, worker_id: str, actor: ActorHandle[Any]) -> None:
        self.worker_id, self.actor = worker_id, actor

    async def generate(self, req: GenerateRequest, handle: KVHandle | None) -> AsyncGenerator[StepOutput, None]:
        out: StepOutput
        async for out in _items(self.worker_id, self.actor.generate, req, handle):
            if out.finished:
                await faultpoints.areached("router.finished", (out,))
            yield out

    async def first_token(self, request_id: RequestId, token_ids: tuple[int, ...]) -> bool:
        return await _call(self.worker_id, self.actor.first_token.remote(request_id, token_ids))

    async def abort(self, request_id: RequestId) -> None:
        await _call(self.worker_id, self.actor.abort.remote(request_id))

    async def stats(self) -> WorkerStats:
        return await _call(self.worker_id, self.actor.stats.remote())


class RouterActor:
    """Ray shell: sync `__init__`, then `start()` binds the server and returns its URL.

    Worker actors are registered by id; registering an id again (a replacement actor) swaps the
    handle. An actor that Ray restarts behind the same handle rejoins on its own when its stats
    answer again.

    The router comes back too, but not through Ray: it is created with `max_restarts=0` and
    `Deployment.supervise` (what `pdserve serve` runs) creates a new one when it died. Ray's memory
    monitor kills retriable workers first, newest first; a restartable router (the newest actor,
    ~0.2 GB) was its first victim whenever the machine ran short of memory, whoever used it. Its
    constructor takes only small values inline (the config and the worker ids, never handles, which
    Ray would keep in the object store): it looks the workers up by name (`worker_actor_name`) on
    `start()`, registers every instance, and serves. `start()` is idempotent. Requests in flight when
    a router died are lost to their clients (their streams break); the workers free their blocks
    when the dead router's streams go away, or at their KV lease.
    """

    def __init__(self, cfg: ServingConfig, tokenizer_dir: str | None = None,
                 prefill: Sequence[str] = (), decode: Sequence[str] = ()) -> None:
        self.cfg, self.tokenizer_dir = cfg, tokenizer_dir
        block_size = cfg.engine.block_size if cfg.engine.enable_prefix_caching else None
        self.router = Router(cfg.router, cfg.mode, prefix_block_size=block_size)
        self.router.layerwise = cfg.layerwise_kv
        self._worker_ids = (tuple(prefill), tuple(decode))
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._starting: asyncio.Future[str] | None = None
        self._preparing: asyncio.Future[None] | None = None
        self._app: Any = None

    async def prepare(self, prefill: dict[str, ActorHandle[Any]] | None = None,
                      decode: dict[str, ActorHandle[Any]] | None = None) -> None:
        """All of `start()` but binding the port: register the workers (these, or the named actors
        of the ids given at construction), load the tokenizer, build the app. Idempotent. Raises
        ValueError when a worker id given at construction names no live actor."""
        if self._preparing is None:
            self._preparing = asyncio.ensure_future(self._prepare(prefill, decode))
        try:
            await asyncio.shield(self._preparing)
        except Exception:
            self._preparing = None  # let the next call try again
            raise

    async def start(self, prefill: dict[str, ActorHandle[Any]] | None = None,
                    decode: dict[str, ActorHandle[Any]] | None = None) -> str:
        """`prepare()` (if not done yet), then serve; returns the URL. Idempotent: a later call (or
        one racing it) returns the same URL."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start(prefill, decode))
        try:
            return await asyncio.shield(self._starting)
        except Exception:
            self._starting = None  # let the next call try again (e.g. the port was still held)
            raise

    async def _prepare(self, prefill: dict[str, ActorHandle[Any]] | None,
                       decode: dict[str, ActorHandle[Any]] | None) -> None:
        if prefill is None:
            prefill = await asyncio.to_thread(_named_actors, self._worker_ids[0])
        if decode is None:
            decode = await asyncio.to_thread(_named_actors, self._worker_ids[1])
        for wid, actor in prefill.items():
            await self.register_prefill(wid, actor)
        for wid, actor in decode.items():
            await self.register_decode(wid, actor)
        tokenizer, card = await asyncio.to_thread(self._load_model_card)
        self._app = build_app(self.router, tokenizer, self.cfg, card=card)

    async def _start(self, prefill: dict[str, ActorHandle[Any]] | None,
                     decode: dict[str, ActorHandle[Any]] | None) -> str:
        await self.prepare(prefill, decode)
        config = uvicorn.Config(self._app, host=self.cfg.router.host, port=self.cfg.router.port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raise why it could not start (port in use, ...)
                raise RuntimeError("router: the HTTP server exited during startup")
            await asyncio.sleep(0.02)
        return self._url()

    def _load_model_card(self) -> tuple[Any, ModelCard]:
        from pdserve.models import resolve_model
        from pdserve.tokenizer import Tokenizer

        path = Path(self.tokenizer_dir) if self.tokenizer_dir else resolve_model(self.cfg.model)
        tokenizer = Tokenizer.from_dir(path)
        hf = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        max_len = min(self.cfg.engine.max_model_len, hf.get("max_position_embeddings", self.cfg.engine.max_model_len))
        return tokenizer, ModelCard(self.cfg.model, max_len, vocab_size=tokenizer.vocab_size)

    async def register_prefill(self, worker_id: str, actor: ActorHandle[Any]) -> None:
        self.router.add_prefill(worker_id, RayPrefillClient(worker_id, actor))

    async def register_decode(self, worker_id: str, actor: ActorHandle[Any]) -> None:
        self.router.add_decode(worker_id, RayDecodeClient(worker_id, actor))

    async def deregister(self, worker_id: str) -> None:
        self.router.remove(worker_id)

    async def url(self) -> str:
        return self._url()

    def _url(self) -> str:
        assert self._server is not None and self._server.started, "router: not started"
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        if host in ("0.0.0.0", "::"):  # every interface: name the one other machines know this node by
            host = ray.util.get_node_ip_address()
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def check_health(self) -> None:
        if self._task is None or self._task.done() or self._server is None or not self._server.started:
            raise RuntimeError("router: the HTTP server is not running")

    async def num_pending(self) -> int:
        return len(self.router.requests)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None
