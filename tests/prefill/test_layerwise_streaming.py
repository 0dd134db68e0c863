"""Layer-wise KV streaming between real workers (tiny Llama, loopback transport): the export happens
before the forward, decode's pull runs during it, decode waits for the first token, the tokens are
the colocated ones, and every failure path leaves no pinned or allocated block on either side."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.kvtransfer.factories import make_receiver, make_sender
from pdserve.kvtransfer.types import KVHandle
from pdserve.prefill.worker import PrefillWorker
from pdserve.types import GenerateRequest, RequestId, SamplingParams
from tests.decode.test_handoff_exact import _drain
from tests.net import LOCAL

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = tuple(torch.randint(3, 128, (37,), generator=torch.Generator().manual_seed(5)).tolist())


def _engine(path: Path) -> Engine:
    return Engine.from_config(str(path), EngineConfig(device="cpu", block_size=8, kv_cache_memory_gb=0.01,
                                                      max_model_len=256))


class Pair:
    """A streaming prefill worker and a decode worker; `handles` collects what prefill exported early."""

    def __init__(self, path: Path) -> None:
        kv = KVTransferConfig(transport="loopback", codec="raw", timeout_s=10)
        pe, de = _engine(path), _engine(path)
        self.sender = make_sender(kv, pe.pool, pe.allocator, listen=LOCAL)
        self.receiver = make_receiver(kv, de.pool, listen=LOCAL)
        self.prefill = PrefillWorker(pe, 8, 2048, self.sender)
        self.decode = DecodeWorker(de, DecodeOptions("decode", 8, 2048), receiver=self.receiver)
        self.handles: list[KVHandle] = []
        self.prefill.stream_exports(self.handles.extend)

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()

    def drained(self) -> None:
        """Every block on both sides is free again (the sender's frees land at its poll)."""
        deadline = time.monotonic() + 10
        while (self.prefill.engine.allocator.num_used or self.sender.num_exports) and time.monotonic() < deadline:
            self.prefill.step()
            time.sleep(0.001)
        assert self.prefill.engine.allocator.num_used == 0 and self.sender.num_exports == 0, "prefill kept the KV"
        assert self.decode.engine.allocator.num_used == 0, "decode kept the KV"


@pytest.fixture
def pair(tiny_llama_dir: Path) -> Iterator[Pair]:
    p = Pair(tiny_llama_dir)
    yield p
    p.close()


def test_decode_pulls_during_the_prefill_forward_and_waits_for_the_first_token(pair: Pair, tiny_llama_dir: Path) -> None:
    req = GenerateRequest(RequestId("s"), PROMPT, GREEDY)
    received_during_forward: list[int] = []

    def on_export(handles: list[KVHandle]) -> None:  # before the forward: decode takes it and starts pulling
        pair.handles.extend(handles)
        (h,) = handles
        pair.decode.submit(req, h)
        assert pair.decode.step() == []
        (r,) = pair.decode.scheduler.pulling()
        hook = pair.prefill.sender.layer_hook

        def layer_hook(layer: int) -> None:
            hook(layer)
            if layer == 0:  # the forward blocks here until layer 0 reached decode: the pull overlaps it
                deadline = time.monotonic() + 10
                while not pair.receiver.nbytes(r.kv_transfer) and time.monotonic() < deadline:
                    time.sleep(0.001)
                received_during_forward.append(pair.receiver.nbytes(r.kv_transfer))
        pair.prefill.sender = _HookedSender(pair.sender, layer_hook)

    pair.prefill.on_export = on_export
    pair.prefill.submit(req)
    (res,) = pair.prefill.step()
    pair.prefill.sender = pair.sender
    assert received_during_forward and received_during_forward[0] > 0
    assert res.handle == pair.handles[0]  # the same export, handed out before the forward
    deadline = time.monotonic() + 10
    while pair.decode.scheduler.pulling() and time.monotonic() < deadline:
        assert pair.decode.step() == []
    (held,) = pair.decode.scheduler.held  # the KV landed; no token before prefill's first one
    assert held.num_computed_tokens == len(PROMPT) and not held.output_token_ids and not pair.decode.has_work()
    assert pair.decode.first_token(req.request_id, res.first.token_ids)
    outs = [res.first] + _drain(pair.decode)
    colocated = DecodeWorker(_engine(tiny_llama_dir), DecodeOptions("prefill_priority", 8, 2048))
    assert [t for o in outs for t in o.token_ids] == colocated.run_to_completion([req])[0]
    lat = outs[1].latency
    assert lat is not None and lat.kv_pull == "ok" and lat.kv_exposed_s == 0.0  # landed before the first token
    pair.drained()


class _HookedSender:
    """The sender, with a test's layer hook in front of the real one."""

    def __init__(self, sender: object, hook: object) -> None:
        self._sender, self.layer_hook = sender, hook

    def __getattr__(self, name: str) -> object:
        return getattr(self._sender, name)


def test_a_failed_forward_releases_the_streamed_export_and_fails_the_pull(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    req = GenerateRequest(RequestId("f"), PROMPT, GREEDY)
    pair.prefill.on_export = lambda hs: (pair.handles.extend(hs), pair.decode.submit(req, hs[0]), pair.decode.step())

    def broken_step(batch: object, layer_hook: object = None) -> list:
        layer_hook(0)  # one layer written, then the forward raises
        raise RuntimeError("injected")
    monkeypatch.setattr(pair.prefill.engine, "step", broken_step)
    pair.prefill.submit(req)
    (res,) = pair.prefill.step()
    assert res.first.finish_reason == "error" and res.handle is None
    deadline = time.monotonic() + 10
    while pair.decode.scheduler.pulling() and time.monotonic() < deadline:
        pair.decode.step()  # the send is cancelled: the pull fails (recompute: held for the first token)
    assert pair.decode.scheduler.kv_pulls["failed"] == 1
    assert pair.decode.abort(req.request_id)  # what the router does on prefill's error
    pair.drained()


def test_a_failed_streamed_pull_is_recomputed_once_the_first_token_is_there(pair: Pair, tiny_llama_dir: Path) -> None:
    req = GenerateRequest(RequestId("r"), PROMPT, GREEDY)

    def on_export(handles: list[KVHandle]) -> None:
        pair.decode.submit(req, handles[0])
        pair.decode.step()  # the pull starts...
        pair.sender.release(handles[0].handle_id)  # ...and fails: the source is gone
    pair.prefill.on_export = on_export
    pair.prefill.submit(req)
    (res,) = pair.prefill.step()
    deadline = time.monotonic() + 10
    while not pair.decode.scheduler.held and time.monotonic() < deadline:
        assert pair.decode.step() == []  # on_failure=recompute, but not before the first token
    (held,) = pair.decode.scheduler.held
    assert pair.decode.scheduler.kv_pulls["failed"] == 1 and held.num_computed_tokens == 0
    assert pair.decode.first_token(req.request_id, res.first.token_ids)
    outs = [res.first] + _drain(pair.decode)
    colocated = DecodeWorker(_engine(tiny_llama_dir), DecodeOptions("prefill_priority", 8, 2048))
    assert [t for o in outs for t in o.token_ids] == colocated.run_to_completion([req])[0]
    assert outs[1].latency is not None and outs[1].latency.kv_recomputed
    pair.drained()


def test_a_request_that_ends_at_its_first_token_releases_the_streamed_export(pair: Pair) -> None:
    req = GenerateRequest(RequestId("one"), PROMPT, GREEDY.replace(max_tokens=1))
    pair.prefill.submit(req)
    (res,) = pair.prefill.step()
    assert res.first.finish_reason == "length" and res.handle is None and len(pair.handles) == 1
    pair.drained()


def test_abort_after_the_streamed_handoff_releases_the_export(pair: Pair) -> None:
    req = GenerateRequest(RequestId("a"), PROMPT, GREEDY)
    pair.prefill.submit(req)
    (res,) = pair.prefill.step()
    assert res.handle == pair.handles[0]
    assert pair.prefill.abort(req.request_id)  # the router gave up on it: nobody will pull
    pair.drained()


def test_chunked_prompts_stream_only_their_last_chunk(tiny_llama_dir: Path) -> None:
    p = Pair(tiny_llama_dir)
    try:
        p.prefill.scheduler.token_budget = 16  # 37 tokens: chunks of 16, 16, 5
        p.prefill.submit(GenerateRequest(RequestId("c"), PROMPT, GREEDY))
        assert p.prefill.step() == [] and p.prefill.step() == [] and not p.handles
        (res,) = p.prefill.step()
        assert p.handles == [res.handle] and res.handle is not None and res.handle.num_tokens == len(PROMPT)
        p.decode.submit(GenerateRequest(RequestId("c"), PROMPT, GREEDY), res.handle)
        deadline = time.monotonic() + 10
        while not p.decode.scheduler.held and time.monotonic() < deadline:
            p.decode.step()
        assert p.decode.first_token(RequestId("c"), res.first.token_ids)
        assert len([t for o in _drain(p.decode) for t in o.token_ids]) == GREEDY.max_tokens - 1
        p.drained()
    finally:
        p.close()
