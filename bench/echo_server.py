"""A tiny OpenAI-compatible streaming server with controlled delays, to calibrate the client.

It serves /v1/models, /v1/completions and /v1/chat/completions (SSE, usage chunk, [DONE]): each
request waits for a single "prefill slot" for `prefill_s` (so TTFT grows with load like a real
server's), then streams `max_tokens` tokens `token_gap_s` apart. Knowing the true delays, the
difference to what `pdserve bench` measures is the client's own timing error. Tests also use it
to inject failures (HTTP 500) and stalls. Its "tokens" are whitespace-separated words: `usage.prompt_tokens`
counts the prompt's (all messages' contents, for chat); with `prefix_cache` it also plays a prefix
cache, reporting as `cached_tokens` the longest prefix an earlier request's prompt + answer had.

    python -m pdserve.bench.echo_server --port 8100 --prefill-ms 5 --token-gap-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class EchoConfig:
    prefill_s: float = 0.004  # per request, one at a time
    token_gap_s: float = 0.002  # between streamed tokens
    fail_every: int = 0  # every n-th request (1-based count) answers HTTP 500
    stall_every: int = 0  # every n-th request never sends a token
    usage: bool = True  # send a final usage chunk
    prefix_cache: bool = False  # report `cached_tokens` against earlier prompts + answers (words)
    seen: list[dict] = field(default_factory=list)  # request bodies received, in order


def build_app(cfg: EchoConfig) -> web.Application:
    counter = itertools.count(1)
    prefill_slot = asyncio.Lock()
    history: list[list[str]] = []  # every request's prompt + answer words, for `prefix_cache`

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "echo-model", "object": "model"}]})

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        cfg.seen.append(body)
        n, chat = next(counter), request.path.endswith("chat/completions")
        if cfg.fail_every and n % cfg.fail_every == 0:
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if cfg.stall_every and n % cfg.stall_every == 0:
            await asyncio.sleep(3600)
        async with prefill_slot:
            await asyncio.sleep(cfg.prefill_s)
        num_tokens = int(body["max_tokens"])
        words = _prompt_words(body, chat)
        timings = {"prefill_s": cfg.prefill_s, **_cached(cfg, words, history)}
        history.append(words + [f"t{i}" for i in range(num_tokens)])
        for i in range(num_tokens):
            if i:
                await asyncio.sleep(cfg.token_gap_s)
            choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
            chunk: dict = {"choices": [choice]}
            if i == num_tokens - 1:  # like pdserve's router: a latency breakdown with the last token
                chunk["pdserve_timings"] = {**timings, "decode_s": cfg.token_gap_s * i}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if cfg.usage:
            usage = {"choices": [], "usage": {"prompt_tokens": len(words), "completion_tokens": num_tokens}}
            await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    return app


def _prompt_words(body: dict, chat: bool) -> list[str]:
    texts = [m["content"] for m in body["messages"]] if chat else [body["prompt"]]
    return [w for text in texts for w in text.split()]


def _cached(cfg: EchoConfig, words: list[str], history: list[list[str]]) -> dict[str, float]:
    if not cfg.prefix_cache:
        return {}
    best = 0
    for seen in history:
        n = 0
        while n < min(len(seen), len(words)) and seen[n] == words[n]:
            n += 1
        best = max(best, n)
    return {"cached_tokens": float(best)} if best else {}  # omitted when 0, like pdserve's


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.echo_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--prefill-ms", type=float, default=4.0)
    p.add_argument("--token-gap-ms", type=float, default=2.0)
    args = p.parse_args(argv)
    cfg = EchoConfig(prefill_s=args.prefill_ms / 1e3, token_gap_s=args.token_gap_ms / 1e3)
    web.run_app(build_app(cfg), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
