"""Device settings that take effect: one whole GPU per rank on CUDA, `auto` resolved against the
cluster at launch, and every way to get it wrong is a ConfigError naming the field."""

from __future__ import annotations

import pytest

from pdserve.config import ConfigError, EngineConfig, PoolConfig, ServingConfig


@pytest.mark.parametrize("data,field,words", [
    ({"engine": {"device": "cuda"}}, "prefill.num_gpus", "hides every GPU"),
    ({"engine": {"device": "cuda"}, "prefill": {"num_gpus": 1}}, "decode.num_gpus", "device cuda needs num_gpus: 1"),
    ({"engine": {"device": "cuda"}, "prefill": {"num_gpus": 1}, "decode": {"num_gpus": 0.5}},
     "decode.num_gpus", "NCCL refuses"),
    ({"prefill": {"num_gpus": 0.25}}, "prefill.num_gpus", "two ranks on one GPU"),  # auto may become cuda
    ({"decode": {"num_gpus": 2}}, "decode.num_gpus", "use tp/pp"),
    ({"engine": {"gpu_memory_utilization": 1.5}}, "engine.gpu_memory_utilization", "(0, 1]"),
    ({"engine": {"gpu_memory_utilization": 0}}, "engine.gpu_memory_utilization", "> 0"),
])
def test_gpu_settings_that_cannot_work_name_their_field(data: dict, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        ServingConfig.from_dict(data)
    assert str(e.value).startswith(field) and words in str(e.value), str(e.value)


def test_cuda_with_one_gpu_per_rank_is_valid_and_colocated_checks_only_decode() -> None:
    cfg = ServingConfig.from_dict({"engine": {"device": "cuda"}, "prefill": {"num_gpus": 1}, "decode": {"num_gpus": 1}})
    assert cfg.engine.device == "cuda"
    ServingConfig.from_dict({"mode": "colocated", "engine": {"device": "cuda"}, "decode": {"num_gpus": 1}})
    ServingConfig.from_dict({"engine": {"device": "cpu"}, "decode": {"num_gpus": 0.5}})  # cpu: no NCCL


def test_auto_on_a_gpu_cluster_becomes_cuda_with_one_whole_gpu_per_rank() -> None:
    cfg = ServingConfig(decode=PoolConfig(tp=2)).resolve_device(cluster_gpus=8)
    assert cfg.engine.device == "cuda"
    assert cfg.prefill.num_gpus == cfg.decode.num_gpus == 1.0
    assert cfg.decode.tp == 2


def test_auto_on_a_cpu_cluster_becomes_cpu_and_a_gpu_request_there_is_an_error() -> None:
    assert ServingConfig().resolve_device(cluster_gpus=0).engine.device == "cpu"
    with pytest.raises(ConfigError, match="^decode.num_gpus: 1, but the Ray cluster has no GPUs"):
        ServingConfig(decode=PoolConfig(num_gpus=1)).resolve_device(cluster_gpus=0)
    one = PoolConfig(num_gpus=1)
    cuda = ServingConfig(engine=EngineConfig(device="cuda"), prefill=one, decode=one)
    with pytest.raises(ConfigError, match="^engine.device: cuda"):
        cuda.resolve_device(cluster_gpus=0)


def test_an_explicit_cpu_engine_stays_on_cpu_on_a_gpu_cluster() -> None:
    cfg = ServingConfig(engine=EngineConfig(device="cpu")).resolve_device(cluster_gpus=8)
    assert cfg.engine.device == "cpu" and cfg.decode.num_gpus == 0
