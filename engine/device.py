"""Where an engine runs: the device (with its index), the dtype, and the collective backend for it.

    device: cpu    -> cpu, float32 unless `dtype` says otherwise; collectives on gloo
    device: cuda   -> cuda:<current index>, bfloat16 (or the checkpoint's 16-bit dtype) unless `dtype`
                      says otherwise; tensor collectives on NCCL, control (CPU) collectives on gloo
    device: auto   -> cuda when torch sees a GPU; cpu when the node has none. A node that has GPUs
                      torch cannot see (Ray's num_gpus: 0 sets CUDA_VISIBLE_DEVICES="", or a CPU-only
                      torch build) is an error, never a silent fp32 CPU engine on a GPU box.

The current CUDA device is per thread: every thread that issues collectives or launches kernels on
a rank's GPU calls `bind_thread(device)` first (the loader thread and the step thread alike).
"""

from __future__ import annotations

import glob
import os

import torch

from pdserve.config import EngineConfig

_CHECKPOINT_16BIT = ("bfloat16", "float16")


def node_gpu_count() -> int:
    """GPUs the node has, whatever this process may see (NVIDIA device nodes)."""
    return len(glob.glob("/dev/nvidia[0-9]*"))


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _why_hidden() -> str:
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return "CUDA_VISIBLE_DEVICES is empty (Ray does this for an actor with num_gpus: 0)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    return "torch.cuda.is_available() is False"


def resolve_device(cfg: EngineConfig) -> torch.device:
    """The engine's device with its index; ValueError naming `device` when it cannot take effect."""
    if cfg.device == "cpu":
        return torch.device("cpu")
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    if cfg.device == "cuda":
        raise ValueError(f"device: cuda, but this process sees no CUDA device: {_why_hidden()}")
    if node_gpu_count():
        raise ValueError(f"device: auto would serve on the CPU of a node with {node_gpu_count()} GPUs, because "
                         f"{_why_hidden()}; give each rank a GPU (num_gpus: 1) or set device: cpu")
    return torch.device("cpu")


def resolve_dtype(cfg: EngineConfig, device: torch.device, checkpoint_dtype: str | None = None) -> str:
    """`dtype: auto` is float32 on CPU; on CUDA the checkpoint's 16-bit dtype, else bfloat16."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if device.type != "cuda":
        return "float32"
    return checkpoint_dtype if checkpoint_dtype in _CHECKPOINT_16BIT else "bfloat16"


def resolve_device_dtype(cfg: EngineConfig, checkpoint_dtype: str | None = None) -> tuple[torch.device, str]:
    device = resolve_device(cfg)
    return device, resolve_dtype(cfg, device, checkpoint_dtype)


def checkpoint_dtype(hf_config: dict[str, object]) -> str | None:
    """The dtype a Hugging Face config.json says its weights are stored in (`torch_dtype`, or `dtype`)."""
    value = hf_config.get("torch_dtype", hf_config.get("dtype"))
    return str(value).removeprefix("torch.") if value is not None else None


def backend_for(device: torch.device | str) -> str:
    """The process-group backend of a rank on `device`: gloo on CPU; on CUDA, NCCL for CUDA tensors
    and gloo for CPU tensors (control all-reduces, object collectives) in the same group."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def bind_thread(device: torch.device | str) -> None:
    """Make `device` the calling thread's current CUDA device (no-op on CPU). The current device is
    per thread, and NCCL and the caching allocator act on it."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    if device.index is None:
        raise ValueError(f"device: {device} has no index; resolve it with resolve_device first")
    if torch.cuda.current_device() != device.index:
        torch.cuda.set_device(device)
