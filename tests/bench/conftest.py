"""Fixtures for bench tests: a small BPE tokenizer trained on the real data, and a real HTTP
server speaking the OpenAI streaming protocol with controlled delays (pdserve.bench.echo_server)
on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from pdserve.bench.echo_server import EchoConfig, build_app


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE (vocab 1000) trained on HumanEval and 200 ShareGPT conversations: a real
    `tokenizers` tokenizer.json, like the served model's, without needing the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pdserve.bench.humaneval import load_problems
    from pdserve.bench.sharegpt import load_conversations

    texts = [p + s for p, s in load_problems()] + ["\n\n".join(c) for c in load_conversations()[:200]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(out / "tokenizer.json"))
    return out


@dataclass
class FakeServer:
    url: str
    config: EchoConfig


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeServer]:
    """A real aiohttp server on 127.0.0.1 in a background thread; parametrize indirectly with a
    EchoConfig to change its behaviour."""
    cfg = getattr(request, "param", None) or EchoConfig()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_app(cfg), shutdown_timeout=0.1)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.SockSite(runner, sock).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10), "fake server did not start"
    yield FakeServer(f"http://127.0.0.1:{port}", cfg)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    sock.close()
