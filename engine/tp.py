"""Tensor parallelism as a transform on a loaded model (gpt-fast style), plus process-group setup.

`apply_tp` shards each decoder layer in place for one rank of `tp_size`:

    q/k/v_proj, gate/up_proj   column-parallel: each rank keeps its slice of output rows (heads)
    o_proj, down_proj          row-parallel: each rank keeps its slice of input columns, then the
                               partial outputs are summed across ranks with an all-reduce

so a layer needs two all-reduces and no other communication. Heads are split in contiguous
ranges, q and kv alike, which keeps grouped-query attention's q-head → kv-head mapping local to a
rank; each rank's KVLayout therefore has num_kv_heads / tp heads. Embeddings, norms and lm_head
stay replicated (the hidden state is whole on every rank after each all-reduce), so every rank
computes the same logits.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from torch import nn

from pdserve.engine.device import backend_for, bind_thread
from pdserve.engine.model import LlamaForCausalLM


def init_process_group(rank: int, world_size: int, init_method: str, device: torch.device | str = "cpu") -> None:
    """Join this instance's process group on the engine's `device` (with its index on CUDA): NCCL
    carries CUDA tensors (TP all-reduce, PP send/recv, token broadcast), gloo CPU tensors (control
    all-reduces, object collectives) — one `cpu:gloo,cuda:nccl` group, so both kinds of call just work."""
    bind_thread(device)
    if "GLOO_SOCKET_IFNAME" not in os.environ:  # the user's choice wins
        ifname = _interface_towards(urlparse(init_method).hostname or "127.0.0.1")
        if ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname  # read by ProcessGroupGloo; this process only
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world_size)


def _interface_towards(host: str) -> str | None:
    """The network interface this process reaches `host` (the rendezvous, on rank 0's node) through.
    Without it gloo binds the address the hostname resolves to, often a loopback one that ranks on
    another node cannot dial (the stages of an instance split over nodes, `placement.node_groups`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # UDP: picks the route, sends nothing
        except OSError:  # not an IPv4 host: leave gloo's default
            return None
        local = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            try:
                addr = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:  # no IPv4 address
                continue
            if socket.inet_ntoa(addr[20:24]) == local:
                return name
    return None


def check_tp(num_heads: int, num_kv_heads: int, intermediate_size: int, tp_size: int) -> None:
    """Raise ValueError naming `tp` when the model's shapes do not split evenly."""
    for what, n in (("attention heads", num_heads), ("KV heads", num_kv_heads),
                    ("MLP intermediate size", intermediate_size)):
        if n % tp_size:
            raise ValueError(f"tp: {tp_size} does not divide the model's {n} {what}")


def apply_tp(model: LlamaForCausalLM, tp_rank: int, tp_size: int, group: Any = None) -> None:
    """Shard `model`'s layers for rank `tp_rank` of `tp_size`; all-reduces run over `group`."""
    cfg = model.config
    check_tp(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tp_size)
    assert 0 <= tp_rank < tp_size, f"tp_rank {tp_rank} outside [0, {tp_size})"
    if tp_size == 1:
        return
    for layer in model.model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _shard(lin, dim=0, rank=tp_rank, size=tp_size)
        for lin in (attn.o_proj, mlp.down_proj):
            _shard(lin, dim=1, rank=tp_rank, size=tp_size)
            lin.register_forward_hook(_all_reduce_hook(group))


def _shard(lin: nn.Linear, dim: int, rank: int, size: int) -> None:
    """Keep this rank's contiguous 1/size of the weight along `dim` (0: output rows, 1: input columns)."""
    w = lin.weight.detach()
    step = w.shape[dim] // size
    lin.weight = nn.Parameter(w.narrow(dim, rank * step, step).clone(), requires_grad=False)
    if dim == 0:
        lin.out_features = step
        if lin.bias is not None:  # a column-parallel bias splits with its rows (Qwen2's q/k/v bias)
            lin.bias = nn.Parameter(lin.bias.detach().narrow(0, rank * step, step).clone(), requires_grad=False)
    else:
        lin.in_features = step
        # A row-parallel bias would be added once per rank before the sum; Llama-family o/down have none.
        assert lin.bias is None, "row-parallel linear with a bias is not supported"


def _all_reduce_hook(group: Any) -> Any:
    def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)  # (T, hidden): partial sums → full
        return out

    return hook
