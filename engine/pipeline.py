"""Pipeline stages as layer ranges, and the engine one rank of a tp × pp instance runs.

Execution is SPMD: every rank holds a complete Engine (requests, scheduler decisions, block
tables, its own KV pool for its layers and heads) and runs the same steps on the same inputs;
`broadcast_inputs` lets rank 0 hand each step's new inputs to the others. Per step:

    stage 0:        embed + layers [0, e0)        --send hidden (T, hidden)-->
    stage k:        layers [s_k, e_k)             --send hidden-->
    last stage:     layers [s, L) + norm + logits; rank (last stage, tp 0) samples
    all ranks:      receive the sampled tokens (broadcast) and append them identically

Only one rank samples, so unseeded random sampling cannot diverge across ranks. Stages run one
batch at a time (no micro-batch interleaving), so pp > 1 buys memory, not throughput.
Rank numbering: rank = pp_rank * tp_size + tp_rank, so a stage's TP ranks are adjacent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pdserve.config import EngineConfig
from pdserve.engine.batch import Batch
from pdserve.engine.engine import Engine, load_model
from pdserve.engine.model import LayerHook, LlamaForCausalLM, ModelConfig
from pdserve.engine.sampler import sample
from pdserve.engine.tp import check_tp

T = TypeVar("T")


def layer_ranges(num_layers: int, pp_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) per stage, sizes differing by at most one (earlier stages larger)."""
    if not 1 <= pp_size <= num_layers:
        raise ValueError(f"pp: {pp_size} stages cannot split {num_layers} layers (need 1 <= pp <= layers)")
    base, extra = divmod(num_layers, pp_size)
    bounds = [0]
    for k in range(pp_size):
        bounds.append(bounds[-1] + base + (k < extra))
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class RankLayout:
    """Where this process sits in one instance's tp × pp grid of ranks."""

    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise ValueError(f"tp/pp: sizes must be >= 1, got tp={self.tp_size} pp={self.pp_size}")
        assert 0 <= self.rank < self.world_size, f"rank {self.rank} outside [0, {self.world_size})"

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    def global_rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_rank(self) -> int:
        return self.global_rank(self.pp_rank - 1, self.tp_rank)

    @property
    def next_rank(self) -> int:
        return self.global_rank(self.pp_rank + 1, self.tp_rank)

    @property
    def sampler_rank(self) -> int:
        return self.global_rank(self.pp_size - 1, 0)


def make_tp_group(ranks: RankLayout) -> Any:
    """This rank's TP group. Collective: every rank must call it (new_group is global)."""
    if ranks.tp_size == 1 or ranks.pp_size == 1:
        return None  # no TP, or TP over the whole world: the default group
    mine = None
    for stage in range(ranks.pp_size):
        group = dist.new_group([ranks.global_rank(stage, t) for t in range(ranks.tp_size)])
        if stage == ranks.pp_rank:
            mine = group
    return mine


def broadcast_inputs(items: list[T] | None, src: int = 0) -> list[T]:
    """Rank `src` passes this step's inputs (e.g. new GenerateRequests); every rank gets them back."""
    box: list[Any] = [items if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return list(box[0] or [])


class PipelineEngine(Engine):
    """One rank's engine: a stage's layers, a TP shard of them, and lock-step sampling.

    With tp = pp = 1 it behaves exactly like Engine. Only `step` differs: hidden states travel
    between stages and sampled tokens are broadcast; the bookkeeping after sampling is Engine's.
    """

    def __init__(self, model: LlamaForCausalLM, cfg: EngineConfig, ranks: RankLayout, tokenizer: Any = None,
                 eos_token_ids: frozenset[int] = frozenset()) -> None:
        super().__init__(model, cfg, tokenizer, eos_token_ids)
        self.ranks = ranks
        self.hidden_dtype = next(model.parameters()).dtype

    @classmethod
    def load(cls, model: str, cfg: EngineConfig, ranks: RankLayout) -> PipelineEngine:
        """Load this rank's stage and shard. The process group must be initialised (tp.init_process_group)."""
        from pdserve.models import resolve_model

        mcfg = ModelConfig.from_hf(json.loads((resolve_model(model) / "config.json").read_text()))
        check_tp(mcfg.num_heads, mcfg.num_kv_heads, mcfg.intermediate_size, ranks.tp_size)
        stage = layer_ranges(mcfg.num_layers, ranks.pp_size)[ranks.pp_rank]
        tp_group = make_tp_group(ranks)
        net, tokenizer, eos = load_model(model, cfg, stage, ranks.tp_rank, ranks.tp_size, tp_group)
        return cls(net, cfg, ranks, tokenizer, eos)

    def execute(self, batch: Batch, layer_hook: LayerHook | None = None) -> list[int]:
        r, chunks = self.ranks, batch.chunks
        hidden_in = None
        if not r.is_first_stage:
            hidden_in = torch.empty((batch.num_tokens, self.model_config.hidden_size),
                                    dtype=self.hidden_dtype, device=self.device)  # (T, hidden)
            dist.recv(hidden_in, src=r.prev_rank)
        hidden = self.runner.forward(chunks, hidden_in, layer_hook)  # (T, hidden)
        if not r.is_last_stage:
            dist.send(hidden.contiguous(), dst=r.next_rank)
        sampling = [c for c in chunks if c.samples]
        tokens = torch.zeros(len(sampling), dtype=torch.long, device=self.device)
        if sampling and r.rank == r.sampler_rank:
            logits = self.runner.logits(chunks, hidden)  # (len(sampling), vocab)
            picked = sample(logits, [c.request.sampling for c in sampling], [c.request.num_tokens for c in sampling])
            tokens = torch.tensor(picked, dtype=torch.long, device=self.device)
        if sampling and r.world_size > 1:
            dist.broadcast(tokens, src=r.sampler_rank)
        return tokens.tolist()
