"""The engine on CUDA: bf16 parity with transformers on the same GPU, and TP=2 / PP=2 over NCCL
(one GPU per rank) against one GPU. Skipped, with the reason, without CUDA (or without 2 GPUs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.config import EngineConfig
from pdserve.engine.engine import Engine
from tests.engine.test_tp import assert_matches_reference, generate, requests

pytestmark = pytest.mark.gpu
PROMPTS = [[1, 5, 9, 22, 7], [3, 4], list(range(10, 47)), [100] * 19]
# fp32 for TP/PP: a bf16 all-reduce sums in another order than one GPU, which can flip a greedy tie
TP_CFG = EngineConfig(device="cuda", dtype="float32", block_size=4, kv_cache_memory_gb=0.01,
                      gpu_memory_utilization=None, max_model_len=256)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_bf16_greedy_tokens_match_transformers_on_the_gpu(fixture: str, request: pytest.FixtureRequest) -> None:
    import transformers

    path: Path = request.getfixturevalue(fixture)
    engine = Engine.from_config(str(path), EngineConfig(device="cuda", gpu_memory_utilization=None,
                                                        kv_cache_memory_gb=0.05, max_model_len=256))
    assert engine.device.type == "cuda" and engine.pool.kv.dtype == torch.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).to(engine.device).eval()
    ours = generate(engine, requests())
    for i, p in enumerate(PROMPTS):
        want = hf.generate(torch.tensor([p], device=engine.device), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert ours[f"g{i}"] == want, p


def _rank_main(rank: int, world: int, store: str, model_dir: str, tp: int, pp: int, out_dir: str) -> None:
    from pdserve.engine.pipeline import PipelineEngine, RankLayout, broadcast_inputs
    from pdserve.engine.tp import init_process_group

    init_process_group(rank, world, f"file://{store}", torch.device("cuda", rank))  # NCCL + gloo
    try:
        engine = PipelineEngine.load(model_dir, TP_CFG, RankLayout(tp, pp, rank))
        assert engine.device == torch.device("cuda", rank)
        assert torch.distributed.get_backend() == "cpu:gloo,cuda:nccl"
        reqs = broadcast_inputs(requests() if rank == 0 else None)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"tokens": generate(engine, reqs)}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tp_and_pp_over_nccl_match_one_gpu(tp: int, pp: int, tiny_llama_dir: Path, tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("TP/PP over NCCL needs 2 GPUs (NCCL refuses two ranks on one GPU)")
    ref = generate(Engine.from_config(str(tiny_llama_dir), TP_CFG), requests())
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(tiny_llama_dir), tp, pp, str(tmp_path)),
             nprocs=2, join=True)
    results: list[dict[str, Any]] = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert_matches_reference(results, ref)
