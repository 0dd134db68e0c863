"""Sizing the KV pool from the device's memory (vLLM's `gpu_memory_utilization`), on CUDA.

    budget = total × utilization − peak of torch allocations during a warm-up forward
                                   (weights, activations, attention workspace)
                                 − memory on the GPU outside torch's allocator
                                   (CUDA context, NCCL buffers, other processes)

The warm-up runs one `max_model_len`-token prompt through a pool just big enough for it, which is
freed before the real pool is allocated. On CPU the pool is the fixed `kv_cache_memory_gb`.
"""

from __future__ import annotations

import torch

from pdserve.engine.batch import Chunk
from pdserve.engine.kv_cache import KVLayout, KVPool
from pdserve.engine.model import LlamaForCausalLM
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.runner import ModelRunner
from pdserve.types import RequestId, SamplingParams


def kv_cache_budget_bytes(total: int, free: int, torch_peak: int, torch_reserved: int, utilization: float) -> int:
    """Bytes the KV pool may take (negative when the weights and the warm-up already exceed the share)."""
    outside_torch = max(0, (total - free) - torch_reserved)
    return int(total * utilization) - torch_peak - outside_torch


def warm_up(model: LlamaForCausalLM, layout: KVLayout, device: torch.device, num_tokens: int) -> None:
    """One forward (and logits on a last stage) of a `num_tokens` prompt: the activation peak of a
    full-context prefill. TP ranks all run it (its all-reduces are collectives), as they all build engines."""
    pool = KVPool(layout, layout.num_blocks_for(num_tokens), device)
    req = Request(RequestId("warm-up"), [0] * num_tokens, SamplingParams(), status=RequestStatus.RUNNING,
                  block_table=list(range(pool.num_blocks)))
    runner, chunks = ModelRunner(model, pool), [Chunk(req, num_tokens)]
    hidden_in = None if model.is_first else torch.zeros(
        (num_tokens, model.config.hidden_size), dtype=pool.kv.dtype, device=device)  # (T, hidden)
    hidden = runner.forward(chunks, hidden_in)
    if model.is_last:
        runner.logits(chunks, hidden)


def num_blocks_from_device_memory(model: LlamaForCausalLM, layout: KVLayout, device: torch.device,
                                  utilization: float, num_tokens: int) -> int:
    """KV blocks that fit this engine's share of the GPU after a warm-up forward; ValueError naming
    `gpu_memory_utilization` when none do."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    warm_up(model, layout, device, num_tokens)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    budget = kv_cache_budget_bytes(total, free, peak, torch.cuda.memory_reserved(device), utilization)
    if budget < layout.bytes_per_block:
        raise ValueError(f"gpu_memory_utilization: {utilization} of {total / 2**30:.1f} GiB leaves no room for "
                         f"KV after the weights and a {num_tokens}-token forward ({peak / 2**30:.1f} GiB)")
    return budget // layout.bytes_per_block
