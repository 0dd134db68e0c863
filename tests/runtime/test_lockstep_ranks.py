"""Multi-rank instances without Ray: a TP=2 (or PP=2) prefill instance feeds a single-rank decode
worker, and a single-rank prefill feeds a TP=2 decode instance, through the real workers in
lock-step (gloo, one process per rank, gRPC KV transfer). Greedy tokens must equal colocated
single-rank serving, and no KV block may leak on any rank."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.config import EngineConfig, KVTransferConfig, PoolConfig, ServingConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.engine.pipeline import RankLayout
from pdserve.kvtransfer.factories import make_receiver, make_sender
from pdserve.prefill.worker import PrefillWorker
from pdserve.types import GenerateRequest, RequestId
from tests.decode.test_disaggregated_workers import GREEDY, _colocated, _prompts
from tests.net import LOCAL

ENGINE = EngineConfig(device="cpu", block_size=8, kv_cache_memory_gb=0.01, max_model_len=256)
KV = KVTransferConfig(transport="grpc", codec="raw", timeout_s=10)
TIMEOUT_S = 60


def _serving(model_dir: str, role: str, tp: int, pp: int) -> ServingConfig:
    pool = PoolConfig(tp=tp, pp=pp, max_num_batched_tokens=64)  # small budget: several prefill steps
    return ServingConfig(model=model_dir, engine=ENGINE, kvtransfer=KV, **{role: pool})


def _rank_main(rank: int, role: str, tp: int, pp: int, store: str, model_dir: str, inbox: Any, outbox: Any) -> None:
    """One rank. Rank 0 takes (submit-argument tuples, request ids to abort after one step) from
    `inbox`, steps until done, puts every output on `outbox`, then serves releases until its blocks
    are free."""
    from pdserve.decode.build import build_decode_worker
    from pdserve.prefill.build import build_prefill_worker

    torch.set_num_threads(1)
    build = build_prefill_worker if role == "prefill" else build_decode_worker
    ls = build(_serving(model_dir, role, tp, pp), f"{role}-0", RankLayout(tp, pp, rank), f"file://{store}", LOCAL)
    try:
        if rank == 0:
            submits, aborts = inbox.get(timeout=TIMEOUT_S)
            for args in submits:
                ls.submit(*args)
            outputs = ls.step()
            for rid in aborts:  # runs on rank 0 before the next collective, on followers after it
                assert ls.abort(rid)
            while ls.has_work():
                outputs.extend(ls.step())
            outbox.put(outputs)
            deadline = time.monotonic() + TIMEOUT_S
            while ls.worker.engine.allocator.num_used and time.monotonic() < deadline:
                ls.step()  # frees the exports once every rank's sender saw the release
                time.sleep(0.005)
            ls.stop()
        else:
            ls.run_follower()
        outbox.put(("used", rank, ls.worker.engine.allocator.num_used))
    finally:
        ls.worker.sender.close() if role == "prefill" else ls.worker.receiver.close()
        torch.distributed.destroy_process_group()


def _spawn(role: str, tp: int, pp: int, model_dir: Path, tmp_path: Path) -> tuple[Any, Any, Any]:
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, role, tp, pp, str(tmp_path / "store"), str(model_dir),
                                                  inbox, outbox), daemon=True) for r in range(tp * pp)]
    for p in procs:
        p.start()
    return procs, inbox, outbox


def _join(procs: list[Any], outbox: Any) -> list[int]:
    used = [outbox.get(timeout=TIMEOUT_S)[2] for _ in procs]
    for p in procs:
        p.join(timeout=TIMEOUT_S)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    return used


def _requests(prompts: list[list[int]]) -> list[GenerateRequest]:
    return [GenerateRequest(RequestId(f"r{i}"), tuple(p), GREEDY) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_multirank_prefill_feeds_single_rank_decode(tiny_llama_dir: Path, tmp_path: Path, tp: int, pp: int) -> None:
    prompts = _prompts()
    procs, inbox, outbox = _spawn("prefill", tp, pp, tiny_llama_dir, tmp_path)
    doomed = GenerateRequest(RequestId("x"), tuple(range(3, 103)), GREEDY)  # 100 tokens: 2 chunks of 64
    inbox.put(([(doomed,)] + [(r,) for r in _requests(prompts)], ["x"]))  # aborted holding blocks
    results = outbox.get(timeout=TIMEOUT_S)
    assert "x" not in {res.first.request_id for res in results}
    engine = Engine.from_config(str(tiny_llama_dir), ENGINE)
    receiver = make_receiver(KV, engine.pool, listen=LOCAL)
    decode = DecodeWorker(engine, DecodeOptions("decode", 64, 2048), receiver=receiver)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    try:
        for res in results:
            rid = res.first.request_id
            out[rid].extend(res.first.token_ids)
            assert res.handle is not None and len(res.handle.shards) == tp * pp
            decode.submit(GenerateRequest(rid, tuple(prompts[int(rid[1:])]), GREEDY,
                                          output_token_ids=res.first.token_ids), res.handle)
        deadline = time.monotonic() + TIMEOUT_S
        while decode.has_work():
            assert time.monotonic() < deadline, "decode never finished"
            for o in decode.step():
                out[o.request_id].extend(o.token_ids)
            time.sleep(0.001)
    finally:
        receiver.close()
    assert [out[f"r{i}"] for i in range(len(prompts))] == _colocated(tiny_llama_dir, prompts)
    assert engine.allocator.num_used == 0
    assert _join(procs, outbox) == [0] * (tp * pp), "prefill ranks leaked blocks"


def test_single_rank_prefill_feeds_tp2_decode(tiny_llama_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts()
    procs, inbox, outbox = _spawn("decode", 2, 1, tiny_llama_dir, tmp_path)
    engine = Engine.from_config(str(tiny_llama_dir), ENGINE)
    sender = make_sender(KV, engine.pool, engine.allocator, listen=LOCAL)
    prefill = PrefillWorker(engine, 64, 64, sender)
    try:
        for r in _requests(prompts):
            prefill.submit(r)
        results = []
        while prefill.has_work():
            results.extend(prefill.step())
        out = {res.first.request_id: list(res.first.token_ids) for res in results}
        inbox.put(([(GenerateRequest(res.first.request_id, tuple(prompts[int(res.first.request_id[1:])]), GREEDY,
                                     output_token_ids=res.first.token_ids), res.handle) for res in results], []))
        while True:
            prefill.step()  # serves the releases the decode ranks send
            try:
                outputs = outbox.get(timeout=0.01)
                break
            except queue.Empty:
                continue
        for o in outputs:
            out[o.request_id].extend(o.token_ids)
        deadline = time.monotonic() + TIMEOUT_S
        while engine.allocator.num_used and time.monotonic() < deadline:
            prefill.step()
            time.sleep(0.01)
        assert engine.allocator.num_used == 0, "prefill blocks never released by both decode ranks"
    finally:
        sender.close()
    assert [out[f"r{i}"] for i in range(len(prompts))] == _colocated(tiny_llama_dir, prompts)
    assert _join(procs, outbox) == [0, 0]
