"""Rotary position embedding: inverse frequencies (with Llama-family scaling), the cos/sin tables
built once per model, and their application to (tokens, heads, head_dim) queries and keys."""

from __future__ import annotations

import math

import torch
from torch import nn

from pdserve.engine.model_config import ModelConfig


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
        half = emb.shape[-1] // 2  # rotate_half(x) * sin == swap_halves(x) * sin_signed
        self.register_buffer("sin_signed", torch.cat([-emb[:, :half].sin(), emb[:, half:].sin()], -1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.tables(positions, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) at `positions`, each (T, 1, head_dim), for `apply_rotary`."""
        return (self.cos.index_select(0, positions).unsqueeze(1).to(dtype),
                self.sin_signed.index_select(0, positions).unsqueeze(1).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x (T, heads, head_dim) rotated; the same products and sum as x * cos + rotate_half(x) * sin,
    in three ops fewer (the negation lives in `sin_signed`)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin_signed
