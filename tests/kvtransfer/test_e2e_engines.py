"""Prefill on one Engine -> KV transfer (raw, each transport) -> decode on another Engine gives the
same greedy tokens as one engine doing both."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.engine.batch import Batch, Chunk
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, RequestStatus, append_token
from pdserve.kvtransfer.factories import make_receiver, make_sender
from pdserve.kvtransfer.types import TransferStatus
from pdserve.types import GenerateRequest, RequestId, SamplingParams
from tests.net import LOCAL

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _engine(path: Path, block_size: int) -> Engine:
    torch.set_num_threads(1)
    return Engine.from_config(str(path), EngineConfig(device="cpu", block_size=block_size, kv_cache_memory_gb=0.02,
                                                      max_model_len=256))


def _run(engine: Engine, req: Request) -> list[int]:
    """Step `req` alone until it finishes; returns all its output tokens."""
    req.status = RequestStatus.RUNNING
    while not req.finished:
        assert engine.ensure_blocks(req, req.num_tokens)
        for r, token in engine.step(Batch((Chunk(req, req.num_uncomputed_tokens),))):
            append_token(r, token, engine.eos_token_ids, engine.max_model_len)
    engine.free(req)
    return list(req.output_token_ids)


def _disaggregated(prefill: Engine, decode: Engine, prompt: list[int], transport: str) -> list[int]:
    """`transport` "torch-bytes": the torch transport with its tensor lane off (wire bytes over gloo);
    plain "torch" on these CPU pools moves each layer's KV as tensors over the pair's gloo lane."""
    name, lane = ("torch", "off") if transport == "torch-bytes" else (transport, "auto")
    cfg = KVTransferConfig(transport=name, codec="raw", timeout_s=20, tensor_lane=lane)  # type: ignore[arg-type]
    tx, rx = make_sender(cfg, prefill.pool, prefill.allocator, listen=LOCAL), make_receiver(cfg, decode.pool, listen=LOCAL)
    try:
        req = prefill.add_request(GenerateRequest(RequestId("p"), tuple(prompt), GREEDY))
        first = _run_prefill(prefill, req)
        n = len(prompt)
        handle = tx.export("p", req.block_table[:prefill.layout.num_blocks_for(n)], n)
        prefill.free(req)  # the export's reference keeps the blocks
        d = decode.add_request(GenerateRequest(RequestId("p"), tuple(prompt), GREEDY, output_token_ids=(first,)))
        assert decode.ensure_blocks(d, d.num_tokens)
        xfer = rx.pull(handle, d.block_table)
        assert rx.wait(xfer, 30) is TransferStatus.DONE, rx.poll(xfer)
        assert rx.tensor_frames(xfer) == (decode.layout.num_layers if transport == "torch" else 0)
        d.num_computed_tokens = n
        out = _run(decode, d)
        freed: list = []
        deadline = time.monotonic() + 10
        while not freed and time.monotonic() < deadline:  # the prefill step loop polls its sender
            freed = tx.poll()
            time.sleep(0.01)
        assert freed and prefill.allocator.num_free == prefill.allocator.num_blocks
        return out
    finally:
        rx.close()
        tx.close()


def _run_prefill(engine: Engine, req: Request) -> int:
    req.status = RequestStatus.RUNNING
    assert engine.ensure_blocks(req, req.num_tokens)
    ((_, first),) = engine.step(Batch((Chunk(req, req.num_tokens),)))
    return first


@pytest.mark.parametrize("transport", ["loopback", "grpc", "torch", "torch-bytes"])
def test_disaggregated_matches_colocated_tiny(tiny_llama_dir: Path, transport: str) -> None:
    prefill, decode, both = _engine(tiny_llama_dir, 16), _engine(tiny_llama_dir, 8), _engine(tiny_llama_dir, 16)
    prompt = torch.randint(3, 128, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    want = _run(both, both.add_request(GenerateRequest(RequestId("c"), tuple(prompt), GREEDY)))
    assert _disaggregated(prefill, decode, prompt, transport) == want


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["grpc", "torch"])
def test_disaggregated_matches_colocated_smollm2(smollm2_dir: Path, transport: str) -> None:
    prefill, decode, both = _engine(smollm2_dir, 16), _engine(smollm2_dir, 16), _engine(smollm2_dir, 16)
    prompt = both.tokenizer.encode("The history of the printing press begins in the fifteenth century, when")
    want = _run(both, both.add_request(GenerateRequest(RequestId("c"), tuple(prompt), GREEDY)))
    assert _disaggregated(prefill, decode, prompt, transport) == want
