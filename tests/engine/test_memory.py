"""KV pool sizing from device memory (engine/memory.py): the budget arithmetic, the warm-up forward,
and a resize that frees the old pool before allocating the new one."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.memory import kv_cache_budget_bytes, warm_up

GiB = 2**30


def test_budget_is_the_share_minus_the_warm_up_peak_minus_memory_outside_torch() -> None:
    # 80 GiB GPU at 0.9: 72 GiB; weights + activations peaked at 20 GiB; 22 GiB used, 21 of it
    # reserved by torch: 1 GiB outside torch (context, NCCL) -> 51 GiB for KV
    assert kv_cache_budget_bytes(80 * GiB, 58 * GiB, 20 * GiB, 21 * GiB, 0.9) == int(72 * GiB) - 21 * GiB
    # another process holding 30 GiB on the same GPU counts against this engine's share
    assert kv_cache_budget_bytes(80 * GiB, 28 * GiB, 20 * GiB, 21 * GiB, 0.9) == int(72 * GiB) - 51 * GiB
    assert kv_cache_budget_bytes(80 * GiB, 60 * GiB, 75 * GiB, 20 * GiB, 0.9) < 0  # weights alone exceed the share


def test_warm_up_runs_a_full_context_forward_without_touching_the_model(tiny_llama_dir: Path) -> None:
    engine = Engine.from_config(str(tiny_llama_dir), EngineConfig(device="cpu", max_model_len=64))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    warm_up(engine.model, engine.layout, engine.device, 64)
    for k, v in engine.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_resize_pool_drops_the_old_pool_first(tiny_llama_dir: Path) -> None:
    engine = Engine.from_config(str(tiny_llama_dir), EngineConfig(device="cpu", max_model_len=64,
                                                                 kv_cache_memory_gb=0.001))
    old = weakref.ref(engine.pool.kv)
    engine.resize_pool(7)
    gc.collect()
    assert old() is None and engine.pool.num_blocks == 7 and engine.runner.pool is engine.pool


@pytest.mark.gpu
def test_on_cuda_the_pool_fills_the_share_the_warm_up_leaves(tiny_llama_dir: Path) -> None:
    engine = Engine.from_config(str(tiny_llama_dir), EngineConfig(device="cuda", gpu_memory_utilization=0.5))
    free, total = torch.cuda.mem_get_info(engine.device)
    pool_bytes = engine.pool.kv.numel() * engine.pool.kv.element_size()
    assert engine.pool.kv.device.type == "cuda" and engine.pool.kv.dtype == torch.bfloat16
    assert 0.3 * total < pool_bytes <= 0.5 * total  # most of the share: a tiny model's weights are small
