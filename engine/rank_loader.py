"""Load the engine one rank of a serving instance runs, for any (tp, pp).

World size 1: the complete Engine, no process group. World size > 1: join the instance's process
group and load this rank's stage and TP shard as a PipelineEngine (pipeline.py), with the KV pool
sized like every other rank's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pdserve.config import EngineConfig
from pdserve.engine.device import resolve_device
from pdserve.engine.engine import Engine
from pdserve.engine.pipeline import PipelineEngine, RankLayout
from pdserve.engine.tp import init_process_group


def load_rank_engine(model: str, cfg: EngineConfig, ranks: RankLayout, init_method: str = "") -> Engine:
    """This rank's engine for `model` (a catalog name or an HF directory).

    `init_method` (a `tcp://host:port` or `file://` rendezvous, ignored at world size 1) names the
    instance's process group. Collective at world size > 1: every rank calls it, and every rank
    gets the same number of KV blocks (the minimum: uneven PP stages size their pools
    differently), or block allocation, and with it scheduling, would diverge."""
    torch.set_num_threads(cfg.num_threads)
    if ranks.world_size == 1:
        return Engine.from_config(model, cfg)
    init_process_group(ranks.rank, ranks.world_size, init_method, resolve_device(cfg))
    engine = PipelineEngine.load(model, cfg, ranks)
    n = torch.tensor([engine.allocator.num_blocks])  # a CPU tensor: gloo's half of the group carries it
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    if int(n) < engine.allocator.num_blocks:
        engine.resize_pool(int(n))
    return engine
