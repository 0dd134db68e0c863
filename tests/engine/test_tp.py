"""Tensor parallelism: the sharding transform, and TP=2 over gloo in two processes vs TP=1.

`run_spmd` and `generate` are shared with test_pp.py: every rank runs the serving scheduler
(DecodeWorker) on a PipelineEngine, rank 0 broadcasts the requests, each rank reports what it saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.model import LlamaForCausalLM, ModelConfig
from pdserve.engine.tp import apply_tp, check_tp
from pdserve.types import GenerateRequest, RequestId, SamplingParams

CFG = EngineConfig(device="cpu", block_size=4, kv_cache_memory_gb=0.002, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 5, 9, 22, 7], [3, 4], list(range(10, 47)), [100] * 19]
# Random sampling: compared across ranks only (ranks must agree even without a seed).
RANDOM = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=7, max_tokens=8, ignore_eos=True)]


def requests() -> list[GenerateRequest]:
    reqs = [GenerateRequest(RequestId(f"g{i}"), tuple(p), GREEDY) for i, p in enumerate(PROMPTS)]
    reqs += [GenerateRequest(RequestId(f"s{i}"), (9, 8, 7, 6), sp) for i, sp in enumerate(RANDOM)]
    return reqs


def generate(engine: Engine, reqs: list[GenerateRequest]) -> dict[str, list[int]]:
    """Run the colocated serving scheduler until every request finishes; no blocks may leak."""
    from pdserve.decode.scheduler import DecodeOptions
    from pdserve.decode.worker import DecodeWorker

    worker = DecodeWorker(engine, DecodeOptions("prefill_priority", max_num_seqs=64, max_num_batched_tokens=2048))
    out = dict(zip([r.request_id for r in reqs], worker.run_to_completion(reqs)))
    engine.allocator.check_integrity()
    assert engine.allocator.num_used == 0, "blocks leaked"
    return out


def _rank_main(rank: int, world: int, store: str, model_dirs: list[str], tp: int, pp: int, out_dir: str) -> None:
    from pdserve.engine.pipeline import PipelineEngine, RankLayout, broadcast_inputs
    from pdserve.engine.tp import init_process_group

    torch.set_num_threads(1)
    init_process_group(rank, world, f"file://{store}")
    try:
        results = []
        for model_dir in model_dirs:  # one spawn serves several models: process start-up dominates
            engine = PipelineEngine.load(model_dir, CFG, RankLayout(tp, pp, rank))
            reqs = broadcast_inputs(requests() if rank == 0 else None)
            results.append({"tokens": generate(engine, reqs), "num_layers": engine.layout.num_layers,
                            "num_kv_heads": engine.layout.num_kv_heads})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        torch.distributed.barrier()  # no rank tears its group down while a peer still talks to it
    finally:
        torch.distributed.destroy_process_group()


def run_spmd(model_dirs: list[Path], tp: int, pp: int, tmp_path: Path) -> list[list[dict[str, Any]]]:
    """Spawn tp × pp ranks over gloo; returns [model][rank] results."""
    world = tp * pp
    mp.spawn(_rank_main, args=(world, str(tmp_path / "store"), [str(d) for d in model_dirs], tp, pp, str(tmp_path)),
             nprocs=world, join=True)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    return [[per_rank[r][m] for r in range(world)] for m in range(len(model_dirs))]


def reference(model_dir: Path) -> dict[str, list[int]]:
    return generate(Engine.from_config(str(model_dir), CFG), requests())


def assert_matches_reference(results: list[dict[str, Any]], ref: dict[str, list[int]]) -> None:
    for r in results:
        assert r["tokens"] == results[0]["tokens"], "ranks diverged"  # random requests included
    for rid, toks in ref.items():
        if rid.startswith("g"):
            assert results[0]["tokens"][rid] == toks, rid
        else:
            assert len(results[0]["tokens"][rid]) == 8


def test_apply_tp_shards_heads_and_mlp_contiguously(tiny_qwen2_dir: Path) -> None:
    full = Engine.from_config(str(tiny_qwen2_dir), CFG).model
    shards = []
    for rank in range(2):
        m = Engine.from_config(str(tiny_qwen2_dir), CFG).model
        apply_tp(m, rank, 2)  # no forward, so no process group needed
        shards.append(m)
    for name, layer in full.model.layers.items():
        attn = [s.model.layers[name].self_attn for s in shards]
        mlp = [s.model.layers[name].mlp for s in shards]
        for proj in ("q_proj", "k_proj", "v_proj"):  # column-parallel: rows (heads) split, bias too
            torch.testing.assert_close(torch.cat([getattr(a, proj).weight for a in attn], 0),
                                       getattr(layer.self_attn, proj).weight, rtol=0, atol=0)
            torch.testing.assert_close(torch.cat([getattr(a, proj).bias for a in attn], 0),
                                       getattr(layer.self_attn, proj).bias, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([a.o_proj.weight for a in attn], 1), layer.self_attn.o_proj.weight)
        torch.testing.assert_close(torch.cat([m.down_proj.weight for m in mlp], 1), layer.mlp.down_proj.weight)
        assert attn[0].k_proj.out_features == layer.self_attn.k_proj.out_features // 2
        assert mlp[1].gate_proj.out_features == layer.mlp.gate_proj.out_features // 2


def test_row_parallel_partial_sums_add_up_to_the_full_layer(tiny_llama_dir: Path) -> None:
    """What the all-reduce computes, checked in one process: the sum of the shards' o/down outputs."""
    full = Engine.from_config(str(tiny_llama_dir), CFG).model
    cfg: ModelConfig = full.config
    shards = []
    for rank in range(2):
        m = LlamaForCausalLM(cfg, 64)
        m.load_state_dict(full.state_dict())
        apply_tp(m, rank, 2)
        shards.append(m)
    x = torch.randn(5, cfg.intermediate_size)
    mlp_full = full.model.layers["0"].mlp
    halves = x.chunk(2, dim=-1)
    with torch.no_grad():
        parts = [torch.nn.functional.linear(h, s.model.layers["0"].mlp.down_proj.weight) for h, s in zip(halves, shards)]
        torch.testing.assert_close(parts[0] + parts[1], mlp_full.down_proj(x))


@pytest.mark.parametrize("tp, heads, kv_heads, ffn", [(3, 4, 2, 128), (4, 8, 2, 128), (2, 4, 2, 127)])
def test_uneven_splits_are_value_errors_naming_tp(tp: int, heads: int, kv_heads: int, ffn: int) -> None:
    with pytest.raises(ValueError, match=r"^tp: "):
        check_tp(heads, kv_heads, ffn, tp)


def test_tp2_over_gloo_matches_tp1(tiny_llama_dir: Path, tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    models = [tiny_llama_dir, tiny_qwen2_dir]  # GQA without bias; qkv bias with tied embeddings
    for model_dir, results in zip(models, run_spmd(models, tp=2, pp=1, tmp_path=tmp_path)):
        assert [r["num_kv_heads"] for r in results] == [1, 1]  # 2 KV heads split over 2 ranks
        assert_matches_reference(results, reference(model_dir))


def test_gloo_binds_the_interface_towards_the_rendezvous_host() -> None:
    from pdserve.engine.tp import _interface_towards

    assert _interface_towards("127.0.0.1") == "lo"
    assert _interface_towards("::1") is None  # not IPv4: gloo's default
