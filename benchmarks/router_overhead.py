"""Router overhead: the OpenAI server + Router over instant in-process workers (no model), so every
millisecond measured is the router's own (HTTP, JSON, SSE, dispatch, metrics).

    python benchmarks/router_overhead.py --requests 2000 --concurrency 64 --max-tokens 32

Prints requests/s, streamed tokens/s, and client-side TTFT / end-to-end percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import threading
import time
from collections.abc import AsyncGenerator
from multiprocessing import Queue

import httpx
import uvicorn

from pdserve.config import ServingConfig
from pdserve.router.core import Router
from pdserve.router.openai_api import ModelCard
from pdserve.router.server import build_app
from pdserve.types import GenerateRequest, LatencyBreakdown, PrefillResult, StepOutput, WorkerStats


class InstantPrefill:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    async def prefill(self, req: GenerateRequest) -> PrefillResult:
        return PrefillResult(StepOutput(req.request_id, (1,), " a", latency=LatencyBreakdown()),
                             handle=object())  # type: ignore[arg-type]

    async def abort(self, request_id: str) -> None: ...

    async def stats(self) -> WorkerStats:
        return WorkerStats(self.worker_id)


class InstantDecode(InstantPrefill):
    async def generate(self, req: GenerateRequest, handle: object) -> AsyncGenerator[StepOutput, None]:
        for n in range(len(req.output_token_ids), req.sampling.max_tokens):
            await asyncio.sleep(0)  # yield to the loop, as a real stream would
            done = "length" if n + 1 == req.sampling.max_tokens else None
            yield StepOutput(req.request_id, (1,), " a", done)


class Tok:
    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(json.dumps(messages))


async def one(c: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    ttft = None
    body = {"model": "bench", "prompt": "hello world", "max_tokens": max_tokens, "stream": True}
    async with c.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                ttft = time.perf_counter() - t0
    return ttft or 0.0, time.perf_counter() - t0


async def drive(url: str, n: int, concurrency: int, max_tokens: int) -> list[tuple[float, float]]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        async def task() -> tuple[float, float]:
            async with sem:
                return await one(c, url, max_tokens)
        return await asyncio.gather(*(task() for _ in range(n)))


def serve(port_out: Queue[int]) -> None:
    """The server, in its own process so the load generator does not share its GIL."""
    cfg = ServingConfig(model="bench")
    router = Router(cfg.router, cfg.mode)
    router.add_prefill("p0", InstantPrefill("p0"))
    router.add_decode("d0", InstantDecode("d0"))
    app = build_app(router, Tok(), cfg, card=ModelCard("bench", 4096))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port_out.put(server.servers[0].sockets[0].getsockname()[1])
    thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ports: Queue[int] = ctx.Queue()
    proc = ctx.Process(target=serve, args=(ports,), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{ports.get(timeout=60)}/v1/completions"
    try:
        asyncio.run(drive(url, 50, 8, args.max_tokens))  # warm up
        t0 = time.perf_counter()
        res = asyncio.run(drive(url, args.requests, args.concurrency, args.max_tokens))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.join(10)
    ttft = sorted(r[0] for r in res)
    e2e = sorted(r[1] for r in res)

    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3

    print(f"requests={args.requests} concurrency={args.concurrency} max_tokens={args.max_tokens}")
    print(f"throughput: {args.requests / wall:.0f} req/s, {args.requests * args.max_tokens / wall:.0f} streamed tok/s")
    print(f"TTFT ms: p50 {pct(ttft, .5):.2f}  p99 {pct(ttft, .99):.2f}  mean {statistics.mean(ttft) * 1e3:.2f}")
    print(f"E2E  ms: p50 {pct(e2e, .5):.2f}  p99 {pct(e2e, .99):.2f}")


if __name__ == "__main__":
    main()
