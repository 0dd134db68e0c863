"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2) in plain PyTorch over a paged KV cache.

One model file, Hugging Face parameter names, so a checkpoint loads with `load_state_dict`.
The forward runs a flat batch of tokens from many sequences (varlen prefill, decode, or a mix);
`AttentionMetadata` (engine/attention.py) says which token belongs where. A model may hold only
a layer range [start, end) — a pipeline stage; tensor parallelism is applied afterwards as a
transform (engine/tp.py) and only changes the head counts this file reads from the modules.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.kernels import Kernels
from pdserve.engine.kv_cache import KVPool
from pdserve.engine.layers import DecoderLayer, RMSNorm, StepContext
from pdserve.engine.matmul import Matmul
from pdserve.engine.native_decode import NativeDecode
from pdserve.engine.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from pdserve.engine.rotary import RotaryEmbedding, apply_rotary

__all__ = ["LayerHook", "LlamaForCausalLM", "Matmul", "ModelConfig", "RMSNorm", "RotaryEmbedding",
           "SUPPORTED_ARCHITECTURES", "apply_rotary"]

LayerHook = Callable[[int], None]


class _Backbone(nn.Module):
    """Holds `embed_tokens`, `layers` and `norm` under HF's `model.` prefix."""

    def __init__(self, cfg: ModelConfig, start: int, end: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if start == 0 else None
        # ModuleDict keyed by the global layer index keeps HF names (model.layers.{i}.*) for any stage.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in range(start, end)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if end == cfg.num_layers else None


class LlamaForCausalLM(nn.Module):
    """Layers [start, end) of a Llama-family model. The first stage embeds; the last computes logits."""

    def __init__(self, cfg: ModelConfig, max_positions: int, layer_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.start, self.end = layer_range or (0, cfg.num_layers)
        assert 0 <= self.start < self.end <= cfg.num_layers, f"bad layer range {layer_range}"
        self.model = _Backbone(cfg, self.start, self.end)
        self.rope = RotaryEmbedding(cfg, max_positions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.is_last else None
        self.linear: Matmul | None = None  # picked on the first forward, after .to(device/dtype)
        self.native_kernels = True  # let Matmul use engine/kernels.py where it builds

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.config.num_layers

    def forward(self, tokens_or_hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                pool: KVPool, layer_hook: LayerHook | None = None) -> torch.Tensor:
        """Token ids (T,) on the first stage, hidden states (T, hidden) on later ones → hidden (T, hidden).

        KV for the new tokens is written into `pool` (local layer index = global − start);
        `layer_hook(global_layer)` runs once that layer's KV is in the pool.
        """
        x = self.model.embed_tokens(tokens_or_hidden) if self.is_first else tokens_or_hidden
        step = self.step_context(positions, meta, x.dtype)
        fused = NativeDecode.for_step(step, x, list(self.model.layers.values())) if self.native_kernels else None
        if fused is not None:
            x = x.contiguous() if self.is_first else x.clone(memory_format=torch.contiguous_format)  # updated in place
        for local, (name, layer) in enumerate(self.model.layers.items()):
            k_cache, v_cache = pool.layer(local)
            if fused is not None:
                fused.layer(layer, k_cache, v_cache, x)
            else:
                x = layer.forward(x, step, k_cache, v_cache)  # no hooks live on layers: skip Module.__call__
            if layer_hook is not None:
                layer_hook(int(name))
        return step.linear.norm(self.model.norm, x) if self.is_last else x

    def step_context(self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> StepContext:
        if self.linear is None:
            self.linear = Matmul(positions.device, dtype, self.native_kernels)
        cos, sin = self.rope.tables(positions, dtype)
        return StepContext(cos, sin, meta, self.linear)

    def pack_for_native(self, k: Kernels) -> None:
        """Fuse q/k/v and gate/up and repack every matrix the native GEMV reads (engine/kernels.py)
        now, at start-up, rather than in the first small step (~0.3 s for SmolLM2; the packed copies
        take as much memory again as the matrices)."""
        for layer in self.model.layers.values():
            attn, mlp = layer.self_attn, layer.mlp
            attn.fuse()
            mlp.fuse()
            for w in (attn.qkv_weight, attn.o_proj.weight, mlp.gate_up_weight, mlp.down_proj.weight):
                k.packed(w)
        if self.lm_head is not None:
            k.packed(self.lm_head.weight)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.lm_head is not None, "logits are computed on the last pipeline stage only"
        if self.linear is None:
            self.linear = Matmul(hidden.device, hidden.dtype, self.native_kernels)
        return self.linear(hidden.contiguous(), self.lm_head.weight).float()  # (N, vocab)

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load this stage's share of a full HF checkpoint; tied embeddings fill lm_head. `assign`
        takes the given tensors as the parameters (a model built on `meta` gets its memory this way)."""
        own = self.state_dict()
        if self.lm_head is not None and "lm_head.weight" not in tensors:
            tensors = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
        missing = [k for k in own if k not in tensors]
        if missing:
            raise ValueError(f"model: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        self.load_state_dict({k: tensors[k] for k in own}, strict=True, assign=assign)
        if self.config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight  # one copy in memory, as the checkpoint has
