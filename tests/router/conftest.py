"""Router test fixtures: in-process fake prefill/decode clients and a byte-level fake tokenizer.

The fakes follow the `PrefillClient`/`DecodeClient` contracts with a deterministic "model": the next
token is `next_token(previous token)`, so a request re-dispatched mid-stream must continue exactly
where the dead instance stopped. Each fake can be killed (calls and live streams raise
`WorkerDeadError`) and revived, and records what it was asked to do.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from pdserve.config import RouterConfig
from pdserve.router.core import Router
from pdserve.router.errors import RequestFailedError, WorkerDeadError
from pdserve.types import GenerateRequest, LatencyBreakdown, PrefillResult, RequestId, StepOutput, WorkerStats

VOCAB = 256


def next_token(prev: int) -> int:
    return (prev * 7 + 3) % VOCAB


def expected_tokens(prompt: list[int] | tuple[int, ...], n: int) -> list[int]:
    out, prev = [], prompt[-1]
    for _ in range(n):
        prev = next_token(prev)
        out.append(prev)
    return out


def token_text(t: int) -> str:
    return f" t{t}"


@dataclass(frozen=True)
class FakeHandle:
    """Stands in for a KVHandle: the router must treat it as opaque."""

    request_id: str
    num_tokens: int


@dataclass
class _Base:
    worker_id: str
    delay_s: float = 0.0
    dead: bool = False
    fail_requests: bool = False  # raise RequestFailedError (a per-request failure)
    aborted: list[str] = field(default_factory=list)
    num_blocks: int = 100
    used_blocks: int = 0
    max_num_seqs: int = 64  # the scheduling limits a decode instance reports (a local prefill's slack)
    max_num_batched_tokens: int = 256
    block_size: int = 16

    def kill(self) -> None:
        self.dead = True

    def revive(self) -> None:
        self.dead = False

    def _check(self) -> None:
        if self.dead:
            raise WorkerDeadError(self.worker_id)

    async def abort(self, request_id: RequestId) -> None:
        self._check()
        self.aborted.append(request_id)

    async def stats(self) -> WorkerStats:
        self._check()
        return WorkerStats(self.worker_id, num_running=len(self._active()),
                           num_free_blocks=self.num_blocks - self.used_blocks, num_total_blocks=self.num_blocks,
                           max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                           block_size=self.block_size)

    def _active(self) -> set[str]:
        return set()


@dataclass
class FakePrefill(_Base):
    calls: list[GenerateRequest] = field(default_factory=list)
    hang: bool = False  # never answer (a wedged instance)

    async def prefill(self, req: GenerateRequest) -> PrefillResult:
        self._check()
        self.calls.append(req)
        return await self._forward(req)

    async def prefill_stream(self, req: GenerateRequest) -> AsyncIterator[FakeHandle | PrefillResult]:
        """Layer-wise streaming: the handle before the "forward" (`delay_s`), then the result."""
        self._check()
        self.calls.append(req)
        yield FakeHandle(req.request_id, len(req.prompt_token_ids))
        yield await self._forward(req)

    async def _forward(self, req: GenerateRequest) -> PrefillResult:
        if self.hang:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay_s)
        self._check()
        if self.fail_requests:
            raise RequestFailedError("bad request")
        tok = next_token(req.prompt_token_ids[-1])
        done = req.sampling.max_tokens == 1
        first = StepOutput(req.request_id, (tok,), token_text(tok), "length" if done else None,
                           latency=LatencyBreakdown(prefill_queue_s=0.001, prefill_s=0.01))
        return PrefillResult(first, None if done else FakeHandle(req.request_id, len(req.prompt_token_ids)))


@dataclass
class FakeDecode(_Base):
    calls: list[tuple[GenerateRequest, object]] = field(default_factory=list)
    die_after: int | None = None  # die after emitting this many tokens (over all streams)
    num_emitted: int = 0
    running: set[str] = field(default_factory=set)
    first_tokens: dict[str, asyncio.Future[tuple[int, ...]]] = field(default_factory=dict)  # streamed handoffs

    async def first_token(self, request_id: RequestId, token_ids: tuple[int, ...]) -> bool:
        self._check()
        fut = self.first_tokens.pop(request_id, None)
        if fut is None or fut.done():
            return False
        fut.set_result(tuple(token_ids))
        return True

    def _active(self) -> set[str]:
        return self.running

    async def generate(self, req: GenerateRequest, handle: object) -> AsyncIterator[StepOutput]:
        self._check()
        self.calls.append((req, handle))
        self.running.add(req.request_id)
        seen_aborts = len(self.aborted)  # aborts of an earlier stream of this id (a closed early dispatch) do not count
        try:
            if self.fail_requests:
                raise RequestFailedError("bad request")
            if isinstance(handle, FakeHandle) and handle.num_tokens == len(req.prompt_token_ids + req.output_token_ids):
                fut = self.first_tokens[req.request_id] = asyncio.get_running_loop().create_future()
                req = dataclasses.replace(req, output_token_ids=req.output_token_ids + await fut)  # streamed
            prev = (req.prompt_token_ids + req.output_token_ids)[-1]
            latency: LatencyBreakdown | None = (
                LatencyBreakdown(decode_queue_s=0.002, transfer_s=0.003, transfer_bytes=4096, kv_pull="ok")
                if handle is not None else LatencyBreakdown(prefill_queue_s=0.002, prefill_s=0.02))
            for n in range(len(req.output_token_ids), req.sampling.max_tokens):
                await asyncio.sleep(self.delay_s)
                self._check()
                if req.request_id in self.aborted[seen_aborts:]:
                    yield StepOutput(req.request_id, (), finish_reason="abort")
                    return
                prev = next_token(prev)
                self.num_emitted += 1
                if self.die_after is not None and self.num_emitted > self.die_after:
                    self.kill()
                    self._check()
                done = "length" if n + 1 == req.sampling.max_tokens else None
                yield StepOutput(req.request_id, (prev,), token_text(prev), done, latency=latency)
                latency = None
        finally:
            self.running.discard(req.request_id)
            self.first_tokens.pop(req.request_id, None)


class FakeTokenizer:
    """Bytes as tokens (vocab 256); a chat template with visible role markers."""

    eos_token_ids = (0,)
    vocab_size = VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.apply_chat_template(messages))


def make_router(mode: str = "disaggregated", num_prefill: int = 1, num_decode: int = 1, *,
                cfg: RouterConfig | None = None, prefill_cls: type = FakePrefill, decode_cls: type = FakeDecode,
                **kw: object) -> tuple[Router, list[FakePrefill], list[FakeDecode]]:
    """A Router over fake workers (`prefill_cls` / `decode_cls`: a fake's subclass to inject faults)."""
    router = Router(cfg or RouterConfig(), mode, **kw)  # type: ignore[arg-type]
    prefills = [prefill_cls(f"p{i}") for i in range(num_prefill)] if mode == "disaggregated" else []
    decodes = [decode_cls(f"d{i}") for i in range(num_decode)]
    for p in prefills:
        router.add_prefill(p.worker_id, p)
    for d in decodes:
        router.add_decode(d.worker_id, d)
    return router, prefills, decodes


@pytest.fixture
def fake_tokenizer() -> FakeTokenizer:
    return FakeTokenizer()


class LiveServer:
    """A real uvicorn on 127.0.0.1 (ephemeral port) in a thread with its own event loop."""

    def __init__(self, app: object) -> None:
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
