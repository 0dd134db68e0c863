"""What a plan's serving config must say so that `pdserve serve` runs what the search simulated:
engine sizing from the hardware, pools pinned to node types, the KV transport per link, and the
model path the engine can load.

  dtype            bf16 on GPUs (every catalog GPU has bf16 tensor cores), fp32 on CPU workers
  KV cache / worker GPU memory × 0.95 − this rank's weights − the activation reserve
                   (latency.kv_capacity_tokens' arithmetic, in the engine's GB = 1e9 bytes);
                   one value for both pools (the engine config is shared): the smaller pool's;
                   with prefix caching and a decode token limit, a fixed pool of that many
                   tokens (the prefix cache the simulation gave each instance: modes_cli.py)
  max_model_len    the workload's longest request, at most the model's context (SearchSpec)
  batching         max_num_seqs and the prefill token budget the simulation assumed
  transport        torch.distributed (NCCL) on GPUs, inside a node or across; gRPC between CPU
                   workers. codec: raw where KV moves inside a node (NVLink outruns any codec),
                   the searched codec across nodes (the transfer term the search used)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pdserve.models import known_models
from pdserve.placement.candidates import PhaseConfig, Unit
from pdserve.placement.cluster_file import ClusterFile
from pdserve.placement.hardware import ClusterSpec, GPUSpec
from pdserve.placement.latency import activation_reserve_bytes
from pdserve.placement.model_spec import ModelSpec

MEM_UTIL = 0.95  # share of device memory the engine may use (latency.kv_capacity_tokens)
ENGINE_ARCHITECTURES = ("gated",)  # engine/: Llama-family decoders; OPT ("mlp") is plan-only


def kv_cache_memory_gb(model: ModelSpec, gpu: GPUSpec, cfg: PhaseConfig, max_batch_tokens: int,
                       max_num_seqs: int) -> float:
    """KV memory of one worker (one GPU of a tp×pp instance), GB (1e9 bytes), rounded down to 0.1."""
    free = (gpu.mem_bytes * MEM_UTIL - activation_reserve_bytes(model, gpu, cfg.tp, max_batch_tokens, max_num_seqs)
            - model.weight_bytes / cfg.num_gpus)
    return max(0.1, int(free / 1e8) / 10)


def kv_pool_gb(model: ModelSpec, gpu: GPUSpec, cfg: PhaseConfig, num_tokens: int) -> float:
    """KV memory of one worker that holds `num_tokens` tokens in the engine's dtype (fp32 on CPU,
    bf16 on GPUs), GB (1e9 bytes) rounded up to 1e-4 so that whole blocks of them fit."""
    elem = 4 if gpu.device == "cpu" else 2
    per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * elem / cfg.num_gpus
    return math.ceil(num_tokens * per_token / 1e5) / 1e4


@dataclass(frozen=True, kw_only=True)
class PoolPin:
    """Where a pool's worker actors land: Ray resources per actor."""

    node_type: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 1.0
    resources: dict[str, float]


def pool_pins(cluster_file: ClusterFile | None, gpu: GPUSpec) -> dict[str, PoolPin]:
    """Per role ('prefill', 'decode'): the node type and what each worker actor requests. CPUs per
    worker: the node's CPUs shared by its GPUs (one actor per GPU), at least 1."""
    num_gpus = 0.0 if gpu.device == "cpu" else 1.0
    if cluster_file is None:
        return {r: PoolPin(num_gpus=num_gpus, resources={}) for r in ("prefill", "decode")}
    out = {}
    for role in ("prefill", "decode"):
        t = cluster_file.for_role(role)
        cpus = max(1.0, t.cpus // t.gpus) if t.gpus else 1.0
        out[role] = PoolPin(node_type=t.name, num_cpus=cpus, num_gpus=num_gpus, resources=t.pin)
    return out


def transport_for(unit: Unit, cluster: ClusterSpec, gpu: GPUSpec, codec: str) -> tuple[str, str]:
    """(transport, codec) for the links this unit's KV crosses."""
    transport = "grpc" if gpu.device == "cpu" else "torch"
    if unit.decode is None:
        return transport, "raw"  # colocated: no KV moves
    return transport, "raw" if unit.intra_node_transfer else codec


def servable_model(model: ModelSpec, given: str) -> tuple[str, str]:
    """(what to put in the serving config's `model:`, a note when `pdserve serve` cannot load it).
    Servable: a model pdserve ships (`pdserve.models`) or a local HF directory of an architecture
    the engine implements."""
    if model.ffn not in ENGINE_ARCHITECTURES:
        return model.hf_name or given, (f"plan-only: pdserve's engine has no {model.name} architecture "
                                        "(OPT); the plan's numbers hold, `pdserve serve` cannot run it")
    if given in known_models() or model.name in known_models():
        return given if given in known_models() else model.name, ""
    path = Path(given)
    if path.exists():  # a local HF directory or its config.json
        return str(path.resolve() if path.is_dir() else path.resolve().parent), ""
    return model.hf_name or given, (f"set model: to a local directory holding {model.hf_name or model.name} "
                                    "(config.json + safetensors + tokenizer); pdserve does not download it")
