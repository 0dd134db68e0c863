"""The decoder layer of a Llama-family model and its parts (RMSNorm, attention, MLP), with Hugging
Face parameter names; `StepContext` is what every layer of one forward shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.matmul import Matmul
from pdserve.engine.model_config import ModelConfig


@dataclass(frozen=True)
class StepContext:
    """What every layer of one forward shares: computed once per step, not once per layer."""

    cos: torch.Tensor  # (T, 1, head_dim) at each token's position
    sin: torch.Tensor  # (T, 1, head_dim), first half negated (RotaryEmbedding.sin_signed)
    meta: AttentionMetadata
    linear: Matmul


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one op; the same result as below in fp32 (tests/engine)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
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

    def fuse(self) -> None:
        """Concatenate q/k/v into one (out, in) weight (and bias), and make q/k/v_proj views of it:
        one matmul per step instead of three, no second copy. Idempotent; redone if a projection's
        weight is replaced (e.g. by apply_tp)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight, self.qkv_bias = _fuse_rows(projs)
        self._fused_from = tuple(p.weight for p in projs)

    def is_fused(self) -> bool:
        """The fused weight still matches the projections (dict look-ups: this runs every layer)."""
        src, mods = self.__dict__.get("_fused_from"), self._modules
        return (src is not None and mods["q_proj"]._parameters["weight"] is src[0]
                and mods["k_proj"]._parameters["weight"] is src[1] and mods["v_proj"]._parameters["weight"] is src[2])

    def forward(self, x: torch.Tensor, step: StepContext, k_cache: torch.Tensor, v_cache: torch.Tensor,
                residual: torch.Tensor) -> torch.Tensor:
        """residual + o_proj(attention(x)), x (T, hidden)."""
        if not self.is_fused():
            self.fuse()
        # Head counts come from the projections, so a TP-sharded module just works.
        d = self.head_dim
        h_q, h_kv = self.q_proj.out_features // d, self.k_proj.out_features // d
        qkv = step.linear(x, self.qkv_weight, self.qkv_bias)  # (T, (h_q + 2 h_kv) * d)
        T = qkv.shape[0]
        qk = step.linear.rotary(qkv[:, : (h_q + h_kv) * d].view(T, h_q + h_kv, d), step.cos, step.sin)
        v = qkv[:, (h_q + h_kv) * d:].view(T, h_kv, d)
        out = paged_attention(qk[:, :h_q], qk[:, h_q:], v, k_cache, v_cache, step.meta)  # (T, h_q * d)
        return _linear_add(step.linear, out, self.o_proj, residual)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def fuse(self) -> None:
        """gate and up as one (2 * intermediate, in) weight; gate/up_proj become views of it."""
        self.gate_up_weight, _ = _fuse_rows((self.gate_proj, self.up_proj))
        self._fused_from = (self.gate_proj.weight, self.up_proj.weight)

    def is_fused(self) -> bool:
        src, mods = self.__dict__.get("_fused_from"), self._modules
        return (src is not None and mods["gate_proj"]._parameters["weight"] is src[0]
                and mods["up_proj"]._parameters["weight"] is src[1])

    def forward(self, x: torch.Tensor, step: StepContext | None = None, residual: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """[residual +] down(silu(gate(x)) * up(x))."""
        if step is None:  # a plain call, as on an unmodified HF module
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if not self.is_fused():
            self.fuse()
        h = step.linear.silu_mul(step.linear(x, self.gate_up_weight, None))  # gate/up (T, 2 * intermediate)
        if residual is None:
            return self.down_proj(h)
        return _linear_add(step.linear, h, self.down_proj, residual)


def _fuse_rows(projs: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) stacking `projs`' output rows; each projection's parameters become
    views of it (same values, one copy in memory). Ordinary tensors even when the first forward
    runs under inference_mode, so the parameters stay usable outside it."""
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([p.weight for p in projs])
        biases = [p.bias for p in projs]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None  # type: ignore[arg-type]
        assert bias is not None or all(b is None for b in biases), "fusing projections where only some have a bias"
        start = 0
        for p in projs:
            n = p.out_features
            p.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
            if bias is not None:
                p.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
            start += n
    return weight, bias


def _linear_add(linear: Matmul, x: torch.Tensor, lin: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """residual + lin(x), the add fused into the matmul where the backend can. The module's
    forward hooks still run on the matmul's output alone (TP's all-reduce of partial sums)."""
    if lin._forward_hooks:
        out = linear(x, lin.weight, lin.bias)
        for hook in lin._forward_hooks.values():
            replaced = hook(lin, (x,), out)
            out = out if replaced is None else replaced
        return residual + out
    return linear.add(x, lin.weight, lin.bias, residual)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, step: StepContext, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        x = self.self_attn.forward(step.linear.norm(self.input_layernorm, x), step, k_cache, v_cache, residual=x)
        return self.mlp.forward(step.linear.norm(self.post_attention_layernorm, x), step, residual=x)
