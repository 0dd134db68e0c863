"""DecodeScheduler owns the request's life: pull admission under one `max_num_seqs` and one block
reserve, the move on pull done / failed, and `update` (stop check, finish, queue removal), with the
latency each request reports once. A real tiny engine, no transfer: the pulls' outcomes are given."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pdserve.config import EngineConfig
from pdserve.decode.scheduler import DecodeOptions, DecodeScheduler
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, RequestStatus
from pdserve.types import GenerateRequest, LatencyBreakdown, RequestId, SamplingParams

BLOCK = 8


@dataclass(frozen=True)
class Handle:
    """What the scheduler reads of a KVHandle: how many tokens' KV waits on prefill."""

    num_tokens: int


def _engine(path: Path, num_blocks: int) -> Engine:
    engine = Engine.from_config(str(path), EngineConfig(device="cpu", block_size=BLOCK, kv_cache_memory_gb=0.01,
                                                        max_model_len=256))
    engine.resize_pool(num_blocks)
    return engine


def _pulled(engine: Engine, rid: str, prompt_len: int, max_tokens: int = 4) -> Request:
    """A request as decode gets it from the router: prompt + prefill's first token, KV remote."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    r = engine.add_request(GenerateRequest(RequestId(rid), tuple(range(3, 3 + prompt_len)), params,
                                           output_token_ids=(7,)))
    r.kv_handle = Handle(prompt_len)
    return r


def test_pull_admission_shares_max_num_seqs_with_running(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, 16)
    s = DecodeScheduler(engine, DecodeOptions("decode", max_num_seqs=3))
    reqs = [_pulled(engine, f"r{i}", n) for i, n in enumerate((20, 20, 8, 8))]
    for r in reqs:
        s.add(r, now=1.0)
    assert all(r.status is RequestStatus.WAITING_FOR_REMOTE_KVS for r in reqs) and list(s.awaiting_kv) == reqs
    assert s.admit_pulls(now=2.0) == reqs[:3]  # the fourth waits for a sequence slot, KV pinned on prefill
    assert s.pulling() == reqs[:3] and not reqs[3].block_table and reqs[0].pull_started_s == 2.0
    s.pull_done(reqs[0], landed_s=2.5, nbytes=100)
    assert s.running == [reqs[0]] and reqs[0].num_computed_tokens == 20 and reqs[0].status is RequestStatus.RUNNING
    assert reqs[0].latency == LatencyBreakdown(decode_queue_s=1.0, transfer_s=0.5, transfer_bytes=100, kv_pull="ok")
    assert s.admit_pulls(now=3.0) == []  # one running + two pulling: still full
    assert s.pull_failed(reqs[1], "timed_out", "timed out", now=3.0) is None  # recompute: out of the pull slots
    assert list(s.waiting) == [reqs[1]] and reqs[1].num_computed_tokens == 0 and reqs[1].queued_s == 3.0
    assert reqs[1].latency.kv_recomputed and reqs[1].latency.kv_pull == "timed_out"
    assert reqs[1].latency.transfer_bytes is None and reqs[1].latency.transfer_s == 1.0
    assert s.admit_pulls(now=3.0) == [reqs[3]]  # the failed pull's slot is free until its recompute runs
    assert len(s.running) + len(s.pulling()) == s.max_num_seqs
    assert dict(s.kv_pulls) == {"ok": 1, "timed_out": 1, "recomputed": 1} and s.kv_pull_nbytes == 100


def test_pull_admission_keeps_one_block_per_running_request(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, 8)
    s = DecodeScheduler(engine, DecodeOptions("decode"))
    first = _pulled(engine, "first", 16)
    s.add(first, now=0.0)
    assert s.admit_pulls(now=0.0) == [first]
    s.pull_done(first, landed_s=0.0, nbytes=1)
    free = engine.allocator.num_free
    too_big, fits = _pulled(engine, "big", free * BLOCK), _pulled(engine, "fits", (free - 1) * BLOCK)
    s.add(too_big, now=0.0)
    assert s.admit_pulls(now=0.0) == []  # every free block, but the running request's next token needs one
    s.finish(too_big, "abort")
    s.add(fits, now=0.0)
    assert s.admit_pulls(now=0.0) == [fits] and engine.allocator.num_free == 1
    assert too_big.finished and too_big.request_id not in s.requests


def test_failed_pull_with_on_failure_fail_ends_the_request(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, 16)
    s = DecodeScheduler(engine, DecodeOptions("decode", on_failure="fail"))
    r = _pulled(engine, "r", 20)
    s.add(r, now=0.0)
    s.admit_pulls(now=0.0)
    out = s.pull_failed(r, "failed", "connection reset", now=1.0)
    assert out is not None and out.finish_reason == "error" and "connection reset" in (out.error or "")
    assert r.finished and not s.has_work() and engine.allocator.num_used == 0
    assert dict(s.kv_pulls) == {"failed": 1}


def test_update_finishes_frees_and_reports_latency_once(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, 16)
    s = DecodeScheduler(engine, DecodeOptions("decode"))
    r = _pulled(engine, "r", 20, max_tokens=3)  # the first token came from prefill: two more here
    s.add(r, now=0.0)
    s.admit_pulls(now=1.0)
    s.pull_done(r, landed_s=1.5, nbytes=64)
    outs = []
    while s.has_work():
        batch = s.schedule(now=2.0)
        outs += s.update(engine.step(batch), now=3.0)
    assert [o.finish_reason for o in outs] == [None, "length"] and len(r.output_token_ids) == 3
    assert outs[0].latency == LatencyBreakdown(decode_queue_s=1.0, transfer_s=0.5, transfer_bytes=64, kv_pull="ok")
    assert outs[1].latency is None
    assert r.finished and r.finish_reason == "length" and not s.running and not s.requests
    assert engine.allocator.num_used == 0


def test_a_request_computed_here_reports_its_queue_and_prefill(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, 16)
    s = DecodeScheduler(engine, DecodeOptions("prefill_priority"))
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    r = engine.add_request(GenerateRequest(RequestId("c"), (3, 4, 5, 6, 7), params))
    s.add(r, now=1.0)
    (first,) = s.update(engine.step(s.schedule(now=1.5)), now=2.25)
    assert first.latency == LatencyBreakdown(prefill_queue_s=0.5, prefill_s=0.75)
    (last,) = s.update(engine.step(s.schedule(now=3.0)), now=3.5)
    assert last.finish_reason == "length" and last.latency is None and engine.allocator.num_used == 0


def test_decode_options_name_the_bad_field() -> None:
    with pytest.raises(ValueError, match="policy"):
        DecodeOptions("fcfs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_num_seqs"):
        DecodeOptions(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        DecodeOptions(max_num_batched_tokens=-1)
    with pytest.raises(ValueError, match="on_failure"):
        DecodeOptions(on_failure="retry")  # type: ignore[arg-type]
