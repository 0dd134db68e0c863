"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2) in plain PyTorch over a paged KV cache.

One model file, Hugging Face parameter names, so a checkpoint loads with `load_state_dict`.
The forward runs a flat batch of tokens from many sequences (varlen prefill, decode, or a mix);
`AttentionMetadata` (engine/attention.py) says which token belongs where. A model may hold only
a layer range [start, end) — a pipeline stage; tensor parallelism is applied afterwards as a
transform (engine/tp.py) and only changes the head counts this file reads from the modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.kv_cache import KVPool

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

LayerHook = Callable[[int], None]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 2048
    architecture: str = "LlamaForCausalLM"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"model: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            architecture=arch,
        )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,), with the scaling variants Llama-family configs use."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind is not None:
        raise ValueError(f"model: unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    return inv.float()


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(cfg))  # (max_positions, head_dim // 2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_positions, head_dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # (T, 1, head_dim)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                meta: AttentionMetadata, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        # Head counts come from the projections, so a TP-sharded module just works.
        h_q = self.q_proj.out_features // self.head_dim
        h_kv = self.k_proj.out_features // self.head_dim
        q = self.q_proj(x).view(-1, h_q, self.head_dim)  # (T, h_q, head_dim)
        k = self.k_proj(x).view(-1, h_kv, self.head_dim)  # (T, h_kv, head_dim)
        v = self.v_proj(x).view(-1, h_kv, self.head_dim)
        q, k = rope(positions, q, k)
        out = paged_attention(q, k, v, k_cache, v_cache, meta)  # (T, h_q * head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                meta: AttentionMetadata, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        for local, (name, layer) in enumerate(self.model.layers.items()):
            k_cache, v_cache = pool.layer(local)
            x = layer(x, positions, self.rope, meta, k_cache, v_cache)
            if layer_hook is not None:
                layer_hook(int(name))
        return self.model.norm(x) if self.is_last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.lm_head is not None, "logits are computed on the last pipeline stage only"
        return self.lm_head(hidden).float()  # (N, vocab)

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
