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

from pdserve.engine import kernels
from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.kv_cache import KVPool

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

LayerHook = Callable[[int], None]


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class Matmul:
    """The matmul every projection uses: `mm(x, w, b)` = F.linear(x, w, b), and `mm.add(x, w, b, r)`
    = r + F.linear(x, w, b) with the add fused where the backend can. Backends, by batch rows:

    - rows <= kernels.MAX_ROWS on CPU fp32: the native GEMV (engine/kernels.py), when it builds
      (`norm` likewise runs RMSNorm natively there);
    - CPU fp32 otherwise: oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the op inductor's
      CPU freezing pass emits) on the plain (out, in) weight: on the development machine (AMD EPYC)
      `F.linear` goes to MKL's sgemm, which runs a 512-token prefill 1.6-2x slower (BENCHMARKS.md §1);
    - anything else: F.linear.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype, native: bool = True) -> None:
        cpu32 = torch.device(device).type == "cpu" and dtype == torch.float32
        self.onednn = cpu32 and _probe_onednn()
        self.native: kernels.Kernels | None = kernels.load() if cpu32 and native else None

    @property
    def name(self) -> str:
        return "+".join(n for n, on in (("native", self.native is not None), ("onednn", self.onednn)) if on) or "torch"

    def _native_ok(self, x: torch.Tensor, w: torch.Tensor, *others: torch.Tensor | None) -> bool:
        return (self.native is not None and x.dim() == 2 and x.shape[0] <= kernels.MAX_ROWS and x.is_contiguous()
                and w.is_contiguous() and all(t is None or t.is_contiguous() for t in others))

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self._native_ok(x, w, b):
            return kernels.linear_small(self.native, x, w, b)
        if self.onednn:
            return _onednn_linear(x, w, b)
        return F.linear(x, w, b)

    def add(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        if self._native_ok(x, w, b, residual):
            return kernels.linear_small(self.native, x, w, b, residual)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
        return residual + F.linear(x, w, b)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """apply_rotary(x, cos, sin_signed); natively at a few rows."""
        if (self.native is not None and x.shape[0] <= kernels.MAX_ROWS and x.stride(2) == 1
                and x.stride(1) == x.shape[2] and cos.is_contiguous() and sin_signed.is_contiguous()):
            return kernels.rope(self.native, x, cos, sin_signed)
        return apply_rotary(x, cos, sin_signed)

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gu = [gate | up] (T, 2 * intermediate); natively at a few rows."""
        if self._native_ok(gu, gu):
            return kernels.silu_mul(self.native, gu)  # type: ignore[arg-type]
        inter = gu.shape[1] // 2
        return F.silu(gu[:, :inter]) * gu[:, inter:]

    def norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        """norm(x), by the native kernel at a few rows (one call instead of torch's five ops)."""
        if self._native_ok(x, norm.weight):
            return kernels.rms_norm(self.native, x, norm.weight, norm.eps)  # type: ignore[arg-type]
        return norm(x)


def _probe_onednn() -> bool:
    """oneDNN's linear exists in this build and agrees with F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen) for s in ((3, 24), (40, 24), (40,)))
        return torch.allclose(_onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class StepContext:
    """What every layer of one forward shares: computed once per step, not once per layer."""

    cos: torch.Tensor  # (T, 1, head_dim) at each token's position
    sin: torch.Tensor  # (T, 1, head_dim), first half negated (RotaryEmbedding.sin_signed)
    meta: AttentionMetadata
    linear: Matmul


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
        for local, (name, layer) in enumerate(self.model.layers.items()):
            k_cache, v_cache = pool.layer(local)
            x = layer.forward(x, step, k_cache, v_cache)  # no hooks live on layers: skip Module.__call__
            if layer_hook is not None:
                layer_hook(int(name))
        return step.linear.norm(self.model.norm, x) if self.is_last else x

    def step_context(self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> StepContext:
        if self.linear is None:
            self.linear = Matmul(positions.device, dtype, self.native_kernels)
        cos, sin = self.rope.tables(positions, dtype)
        return StepContext(cos, sin, meta, self.linear)

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
