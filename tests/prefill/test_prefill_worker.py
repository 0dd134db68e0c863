"""PrefillWorker block ownership: first-token finishes export nothing; an exported request that is
aborted releases its KV at once instead of waiting for the lease."""

from __future__ import annotations

from pathlib import Path

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import RequestStatus
from pdserve.kvtransfer.factories import make_sender
from pdserve.prefill.worker import PrefillWorker
from pdserve.types import GenerateRequest, RequestId, SamplingParams
from tests.net import LOCAL


def _worker(path: Path) -> PrefillWorker:
    cfg = EngineConfig(device="cpu", block_size=8, kv_cache_memory_gb=0.01, max_model_len=256)
    engine = Engine.from_config(str(path), cfg)
    sender = make_sender(KVTransferConfig(transport="loopback", lease_s=3600), engine.pool, engine.allocator, listen=LOCAL)
    return PrefillWorker(engine, 64, 2048, sender)


def _drain(worker: PrefillWorker) -> list:
    results = []
    for _ in range(10):
        results.extend(worker.step())
    return results


def test_request_finished_at_its_first_token_exports_nothing_and_leaves_the_queue(tiny_llama_dir: Path) -> None:
    worker = _worker(tiny_llama_dir)
    try:
        worker.submit(GenerateRequest(RequestId("one"), (5, 6, 7, 8), SamplingParams(temperature=0, max_tokens=1)))
        (result,) = _drain(worker)
        assert result.handle is None and result.first.finish_reason == "length"
        stats = worker.stats()
        assert stats.num_steps == 1 and stats.num_step_tokens == 4 and stats.busy_s > 0
        assert not worker.has_work() and not worker.scheduler.waiting
        assert worker.engine.allocator.num_used == 0
    finally:
        worker.sender.close()


def test_abort_after_export_releases_the_pinned_blocks(tiny_llama_dir: Path) -> None:
    worker = _worker(tiny_llama_dir)
    try:
        worker.submit(GenerateRequest(RequestId("r"), tuple(range(3, 40)), SamplingParams(temperature=0, max_tokens=8)))
        (result,) = _drain(worker)
        assert result.handle is not None
        # the handoff is not a finish: the client never sees one, and the request is HANDED_OFF here
        assert result.first.finish_reason is None and len(result.first.token_ids) == 1
        (r,) = worker.scheduler.handed_off.values()
        assert r.status is RequestStatus.HANDED_OFF and r.finish_reason is None and not r.block_table
        assert r.kv_handle == result.handle and not worker.scheduler.waiting and not worker.has_work()
        assert not worker.scheduler.requests  # out of the queue's index: only the export (by handle id) holds it
        pinned = worker.engine.allocator.num_used
        assert pinned == worker.engine.layout.num_blocks_for(37)
        assert worker.abort(RequestId("r"))  # the router gave up on it: nobody will pull
        worker.step()
        assert worker.engine.allocator.num_used == 0
        assert not worker.abort(RequestId("r"))  # once released, it is unknown
        assert not worker.scheduler.handed_off and not worker.scheduler.requests
        worker.engine.allocator.check_integrity()
    finally:
        worker.sender.close()


def test_queue_time_starts_when_the_instance_received_the_request(tiny_llama_dir: Path) -> None:
    """The actor hands a request to the step thread only between two steps; the time it waited
    for the running step counts as queueing, not as nothing."""
    worker = _worker(tiny_llama_dir)
    try:
        received = worker.clock() - 0.5  # arrived half a second ago, during a long step
        worker.submit(GenerateRequest(RequestId("late"), (5, 6, 7, 8), SamplingParams(temperature=0, max_tokens=1)),
                      received_s=received)
        (result,) = _drain(worker)
        assert result.first.latency.prefill_queue_s >= 0.5 > result.first.latency.prefill_s
        assert result.first.latency.decode_queue_s is None and result.first.latency.kv_pull is None
    finally:
        worker.sender.close()
