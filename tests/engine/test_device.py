"""Device, dtype and collective backend resolution (engine/device.py), on CPU with the probes faked."""

from __future__ import annotations

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine import device as dev


def test_cpu_is_fp32_over_gloo() -> None:
    d, dtype = dev.resolve_device_dtype(EngineConfig(device="cpu"))
    assert (d, dtype, dev.backend_for(d)) == (torch.device("cpu"), "float32", "gloo")
    dev.bind_thread(d)  # a no-op on CPU


def test_cuda_ranks_use_nccl_for_device_tensors_and_gloo_for_control() -> None:
    assert dev.backend_for(torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert dev.backend_for("cuda:0") == "cpu:gloo,cuda:nccl"


def test_cuda_dtype_follows_a_16bit_checkpoint_else_bf16_and_an_explicit_dtype_wins() -> None:
    cuda = torch.device("cuda", 0)
    assert dev.resolve_dtype(EngineConfig(), cuda, "float16") == "float16"
    assert dev.resolve_dtype(EngineConfig(), cuda, "bfloat16") == "bfloat16"
    assert dev.resolve_dtype(EngineConfig(), cuda, "float32") == "bfloat16"
    assert dev.resolve_dtype(EngineConfig(), cuda, None) == "bfloat16"
    assert dev.resolve_dtype(EngineConfig(dtype="float32"), cuda, "bfloat16") == "float32"
    assert dev.resolve_dtype(EngineConfig(), torch.device("cpu"), "bfloat16") == "float32"
    assert dev.checkpoint_dtype({"torch_dtype": "bfloat16"}) == "bfloat16"
    assert dev.checkpoint_dtype({"dtype": "float16"}) == "float16"
    assert dev.checkpoint_dtype({}) is None


def test_auto_on_a_node_whose_gpus_are_hidden_is_an_error_naming_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "cuda_available", lambda: False)
    monkeypatch.setattr(dev, "node_gpu_count", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match=r"^device: auto would serve on the CPU of a node with 8 GPUs.*"
                                         r"CUDA_VISIBLE_DEVICES is empty"):
        dev.resolve_device(EngineConfig())
    assert dev.resolve_device(EngineConfig(device="cpu")) == torch.device("cpu")  # explicit cpu is fine


def test_auto_without_gpus_is_cpu_and_cuda_without_one_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "cuda_available", lambda: False)
    monkeypatch.setattr(dev, "node_gpu_count", lambda: 0)
    assert dev.resolve_device(EngineConfig()) == torch.device("cpu")
    with pytest.raises(ValueError, match="^device: cuda, but this process sees no CUDA device"):
        dev.resolve_device(EngineConfig(device="cuda"))


def test_cuda_resolves_to_the_current_device_with_its_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert dev.resolve_device(EngineConfig(device="cuda")) == torch.device("cuda", 2)
    assert dev.resolve_device(EngineConfig()) == torch.device("cuda", 2)


def test_bind_thread_sets_the_index_only_when_it_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    dev.bind_thread(torch.device("cuda", 0))
    dev.bind_thread(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="has no index"):
        dev.bind_thread("cuda")


@pytest.mark.gpu
def test_on_a_gpu_auto_is_indexed_cuda_and_bf16() -> None:
    d, dtype = dev.resolve_device_dtype(EngineConfig())
    assert d.type == "cuda" and d.index == torch.cuda.current_device() and dtype == "bfloat16"
