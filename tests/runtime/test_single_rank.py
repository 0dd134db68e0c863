"""The one build path at world size 1: a prefill and a decode instance of one rank each, built by
the same functions as tp × pp ranks (engine/rank_loader.py, prefill/build.py, decode/build.py),
need no process group, serve the colocated tokens through a real KV transfer, and return every
block: lock-step and its agreements reduce to the rank's own decisions, step for step."""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from pdserve.config import EngineConfig, KVTransferConfig, PoolConfig, ServingConfig
from pdserve.decode.build import build_decode_worker
from pdserve.engine.pipeline import RankLayout
from pdserve.kvtransfer.types import Span
from pdserve.prefill.build import build_prefill_worker
from pdserve.runtime.lockstep import LockStep
from pdserve.types import GenerateRequest, RequestId
from tests.decode.test_disaggregated_workers import GREEDY, _colocated, _prompts
from tests.net import LOCAL

ENGINE = EngineConfig(device="cpu", block_size=8, kv_cache_memory_gb=0.01, max_model_len=256)
TIMEOUT_S = 30


def _serving(model_dir: Path) -> ServingConfig:
    return ServingConfig(model=str(model_dir), engine=ENGINE, prefill=PoolConfig(max_num_batched_tokens=64),
                         kvtransfer=KVTransferConfig(transport="grpc", codec="raw", timeout_s=10))


def _step_until(ls: LockStep, done: object, also: LockStep | None = None) -> list:
    outputs, deadline = [], time.monotonic() + TIMEOUT_S
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "never finished"
        outputs.extend(ls.step())
        if also is not None:
            also.step()  # the other instance serves its side of the transfer (releases)
        time.sleep(0.001)
    return outputs


def test_single_rank_instances_serve_colocated_tokens_without_a_process_group(tiny_llama_dir: Path) -> None:
    cfg, prompts = _serving(tiny_llama_dir), _prompts()
    prefill = build_prefill_worker(cfg, "prefill-0", RankLayout(), "", LOCAL)
    decode = build_decode_worker(cfg, "decode-0", RankLayout(), "", LOCAL)
    try:
        assert not dist.is_initialized()
        for i, p in enumerate(prompts):
            prefill.submit(GenerateRequest(RequestId(f"r{i}"), tuple(p), GREEDY))
        results = _step_until(prefill, lambda: not prefill.has_work())
        layers = prefill.worker.engine.model_config.num_layers
        heads = prefill.worker.engine.model_config.num_kv_heads
        out: dict[str, list[int]] = {}
        for res in results:
            rid = res.first.request_id
            (shard,) = res.handle.shards  # one rank: one shard, the whole model
            assert (shard.layers, shard.heads) == (Span(0, layers), Span(0, heads))
            out[rid] = list(res.first.token_ids)
            decode.submit(GenerateRequest(rid, tuple(prompts[int(rid[1:])]), GREEDY,
                                          output_token_ids=res.first.token_ids), res.handle)
        for o in _step_until(decode, lambda: not decode.has_work(), also=prefill):
            out[o.request_id].extend(o.token_ids)
        assert [out[f"r{i}"] for i in range(len(prompts))] == _colocated(tiny_llama_dir, prompts)
        assert decode.worker.engine.allocator.num_used == 0
        _step_until(prefill, lambda: prefill.worker.engine.allocator.num_used == 0)
        # the agreed frees reached the worker: it forgot every export (nothing left to abort)
        assert not any(prefill.abort(RequestId(f"r{i}")) for i in range(len(prompts)))
    finally:
        prefill.worker.sender.close()
        decode.worker.receiver.close()


def test_single_rank_abort_of_an_exported_request_frees_its_blocks(tiny_llama_dir: Path) -> None:
    """An abort after export releases through the agreed sender; the agreement frees the blocks at
    the next step."""
    prefill = build_prefill_worker(_serving(tiny_llama_dir), "prefill-0", RankLayout(), "", LOCAL)
    try:
        prefill.submit(GenerateRequest(RequestId("x"), tuple(range(3, 40)), GREEDY))
        (res,) = _step_until(prefill, lambda: not prefill.has_work())
        assert res.handle is not None and prefill.worker.engine.allocator.num_used > 0  # pinned for decode
        assert prefill.abort(RequestId("x"))
        prefill.step()
        assert prefill.worker.engine.allocator.num_used == 0
    finally:
        prefill.worker.sender.close()
