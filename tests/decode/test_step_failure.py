"""A step that raises fails the requests of its batch with explicit error outputs and frees their
blocks; the worker keeps serving (no crash, no restart). Extreme but valid sampling values never
make a step raise (near-zero temperature samples greedily, top-p/top-k edges are guarded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.engine.sampler import sample
from pdserve.kvtransfer.factories import make_sender
from pdserve.prefill.worker import PrefillWorker
from pdserve.types import GenerateRequest, RequestId, SamplingParams
from tests.net import LOCAL

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _engine(path: Path) -> Engine:
    return Engine.from_config(str(path), EngineConfig(device="cpu", block_size=8, kv_cache_memory_gb=0.01, max_model_len=256))


def _poison_execute(engine: Engine, poison: str) -> None:
    """Test-only fault: the forward raises whenever the batch holds request `poison`."""
    execute = engine.execute

    def failing(batch, layer_hook=None):  # noqa: ANN001, ANN202
        if any(c.request.request_id == poison for c in batch.chunks):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return execute(batch, layer_hook)

    engine.execute = failing  # type: ignore[method-assign]


def test_decode_step_failure_fails_its_batch_and_the_worker_serves_on(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir)
    _poison_execute(engine, "bad")
    worker = DecodeWorker(engine, DecodeOptions("prefill_priority", 8, 256))
    for rid in ("good", "bad"):
        worker.submit(GenerateRequest(RequestId(rid), (5, 6, 7), PARAMS))
    outs = worker.step()  # both prompts run in one batch, which raises
    assert {(o.request_id, o.finish_reason) for o in outs} == {("good", "error"), ("bad", "error")}
    assert all("RuntimeError" in o.error for o in outs)
    assert not worker.has_work() and engine.allocator.num_used == 0
    assert worker.stats().num_failed_steps == 1
    worker.submit(GenerateRequest(RequestId("good"), (5, 6, 7), PARAMS))  # the retry the router makes
    got = []
    while worker.has_work():
        got += worker.step()
    assert [o.finish_reason for o in got][-1] == "length" and sum(len(o.token_ids) for o in got) == 4
    engine.allocator.check_integrity()


def test_prefill_step_failure_fails_its_batch(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir)
    _poison_execute(engine, "bad")
    sender = make_sender(KVTransferConfig(transport="loopback"), engine.pool, engine.allocator, listen=LOCAL)
    worker = PrefillWorker(engine, 8, 256, sender)
    worker.submit(GenerateRequest(RequestId("bad"), (5, 6, 7), PARAMS))
    try:
        (res,) = worker.step()
    finally:
        sender.close()
    assert res.handle is None and res.first.finish_reason == "error" and "RuntimeError" in res.first.error
    assert not worker.has_work() and engine.allocator.num_used == 0 and worker.stats().num_failed_steps == 1


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-30, seed=1), SamplingParams(temperature=1e-6), SamplingParams(temperature=1e-5),
    SamplingParams(temperature=1e30, seed=2), SamplingParams(temperature=1e-4, top_p=1e-300, seed=3),
    SamplingParams(temperature=0.7, top_k=10**9, top_p=1e-9), SamplingParams(temperature=2.0, top_k=0, seed=2**62),
])
def test_extreme_sampling_values_sample_a_valid_token(params: SamplingParams) -> None:
    logits = torch.randn(4, 128) * 50
    logits[1, 7] = 1e30  # one overwhelming logit
    tokens = sample(logits, [params] * 4, [3, 4, 5, 6])
    assert all(0 <= t < 128 for t in tokens)
    if params.greedy:
        assert tokens == logits.argmax(-1).tolist()


def test_non_finite_temperature_is_rejected() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("inf"))
