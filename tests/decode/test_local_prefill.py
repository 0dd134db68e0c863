"""A local prefill on a disaggregated decode instance (conditional disaggregation): intended, so not
counted as a recompute (a request that comes without KV for another reason still is); chunked into
the steps within the token budget, after the running decodes, which keep stepping every step; and
the same tokens as a colocated instance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.kvtransfer.factories import make_receiver
from pdserve.types import GenerateRequest, RequestId, SamplingParams, StepOutput
from tests.net import LOCAL

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
BUDGET = 16


def _engine(path: Path) -> Engine:
    return Engine.from_config(str(path), EngineConfig(device="cpu", block_size=8, kv_cache_memory_gb=0.01,
                                                      max_model_len=256))


@pytest.fixture
def decode(tiny_llama_dir: Path) -> Iterator[DecodeWorker]:
    """A disaggregated decode instance (it has a KV receiver) with a small step budget."""
    engine = _engine(tiny_llama_dir)
    receiver = make_receiver(KVTransferConfig(transport="loopback", codec="raw"), engine.pool, listen=LOCAL)
    yield DecodeWorker(engine, DecodeOptions("decode", 8, BUDGET), receiver=receiver)
    receiver.close()


def _req(rid: str, prompt_len: int, local: bool, max_tokens: int = 6) -> GenerateRequest:
    prompt = tuple(3 + (i * 5) % 100 for i in range(prompt_len))
    return GenerateRequest(RequestId(rid), prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                  ignore_eos=True), local_prefill=local)


def _drain(worker: DecodeWorker) -> dict[str, list[StepOutput]]:
    outs: dict[str, list[StepOutput]] = {}
    for _ in range(500):
        if not worker.has_work():
            return outs
        for o in worker.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("the worker never finished")


def test_a_local_prefill_is_not_a_recompute_but_a_request_without_kv_is(decode: DecodeWorker) -> None:
    decode.submit(_req("local", 20, local=True))
    decode.submit(_req("lost", 20, local=False))  # e.g. no prefill instance was left: a fallback
    outs = _drain(decode)
    local, lost = outs["local"][0].latency, outs["lost"][0].latency
    assert local is not None and not local.kv_recomputed and local.prefill_s > 0 and local.kv_pull is None
    assert lost is not None and lost.kv_recomputed
    assert decode.stats().kv_pulls == {"recomputed": 1}  # the fallback is counted, the local prefill is not
    assert [o.token_ids for o in outs["local"]] == [o.token_ids for o in outs["lost"]]  # same prompt, same tokens
    assert decode.engine.allocator.num_used == 0


def test_stats_report_the_limits_a_local_prefill_must_fit(decode: DecodeWorker) -> None:
    s = decode.stats()
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.block_size) == (8, BUDGET, 8)


def test_a_local_prefill_is_chunked_within_the_budget_after_the_running_decodes(decode: DecodeWorker) -> None:
    for i in range(3):
        decode.submit(_req(f"run{i}", 5, local=True, max_tokens=40))
    while len(decode.scheduler.running) < 3:
        decode.step()
    mark, _ = decode.step_log()
    decode.submit(_req("long", 60, local=True))  # 60 prompt tokens, 13 per step at most beside 3 decodes
    while decode.scheduler.waiting:
        outs = decode.step()
        assert {o.request_id for o in outs} >= {"run0", "run1", "run2"}  # no decode skips a step
    _, steps = decode.step_log(mark)
    assert all(sum(s.new_tokens) <= BUDGET for s in steps)
    assert len(steps) >= 60 // (BUDGET - 3)  # the prompt was spread over several steps
    _drain(decode)


def test_a_local_prefill_gives_the_colocated_tokens(decode: DecodeWorker, tiny_llama_dir: Path) -> None:
    colocated = DecodeWorker(_engine(tiny_llama_dir), DecodeOptions("prefill_priority", 8, 2048))
    reqs = [_req(f"r{n}", n, local=True) for n in (3, 17, 40)]
    expected = colocated.run_to_completion([GenerateRequest(r.request_id, r.prompt_token_ids, r.sampling)
                                            for r in reqs])
    assert decode.run_to_completion(reqs) == expected
