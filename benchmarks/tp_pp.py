"""TP / PP on the real model: greedy tokens vs one rank, and the time per engine step.

    python benchmarks/tp_pp.py --tp 2 --pp 1
    python benchmarks/tp_pp.py --tp 1 --pp 2

Runs 3 chat prompts × 32 greedy tokens on one process, then on tp × pp gloo ranks (one thread
each), and prints whether the tokens match and the mean step time of each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pdserve.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.types import GenerateRequest, RequestId, SamplingParams

CFG = EngineConfig(kv_cache_memory_gb=0.2, max_model_len=512)
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child."]


def _requests(engine: Engine) -> list[GenerateRequest]:
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    return [GenerateRequest(RequestId(f"q{i}"), tuple(engine.tokenizer.encode_chat([{"role": "user", "content": q}])),
                            params) for i, q in enumerate(QUESTIONS)]


def _run(engine: Engine) -> tuple[dict[str, list[int]], float]:
    from pdserve.decode.scheduler import DecodeOptions
    from pdserve.decode.worker import DecodeWorker

    worker = DecodeWorker(engine, DecodeOptions("prefill_priority", max_num_seqs=8, max_num_batched_tokens=2048))
    for r in _requests(engine):
        worker.submit(r)
    out: dict[str, list[int]] = {}
    steps, t0 = 0, time.perf_counter()
    while worker.has_work():
        for o in worker.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
        steps += 1
    return out, (time.perf_counter() - t0) / steps


def _rank(rank: int, world: int, tp: int, pp: int, tmp: str) -> None:
    from pdserve.engine.pipeline import PipelineEngine, RankLayout
    from pdserve.engine.tp import init_process_group

    torch.set_num_threads(1)
    init_process_group(rank, world, f"file://{tmp}/store")
    engine = PipelineEngine.load("smollm2-135m", CFG, RankLayout(tp, pp, rank))
    tokens, step_s = _run(engine)
    Path(tmp, f"{rank}.json").write_text(json.dumps({"tokens": tokens, "step_s": step_s}))
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref, ref_step = _run(Engine.from_config("smollm2-135m", CFG))
    with tempfile.TemporaryDirectory() as tmp:
        world = args.tp * args.pp
        mp.spawn(_rank, args=(world, args.tp, args.pp, tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
    print(json.dumps({"tp": args.tp, "pp": args.pp, "tokens_equal": all(r["tokens"] == ref for r in ranks),
                      "step_ms_1rank": round(ref_step * 1e3, 1),
                      "step_ms_parallel": round(max(r["step_s"] for r in ranks) * 1e3, 1)}))


if __name__ == "__main__":
    main()
