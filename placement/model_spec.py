"""The model as the planner sees it: layer shapes, weight bytes and KV bytes per token. From the
catalog in `data/models.yaml` or from any Hugging Face `config.json` (Llama or OPT family)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    ffn: Literal["mlp", "gated"] = "gated"
    tie_word_embeddings: bool = False
    max_model_len: int = 2048
    dtype_bytes: int = 2
    hf_name: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def params_per_layer(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = 2 * h * h + 2 * h * kv  # q, o + k, v
        return attn + (3 if self.ffn == "gated" else 2) * h * self.intermediate_size

    @property
    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.params_per_layer + embed

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer, whole model (a TP×PP instance holds 1/(tp·pp) on each GPU)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def flops_per_token(self) -> float:
        """Dense matmul FLOPs of one token through every layer (2 per multiply-add), no attention."""
        return 2.0 * self.num_layers * self.params_per_layer

    def valid_tp(self, tp: int) -> bool:
        """The engine's rule (engine/tp.py `check_tp`): TP divides the attention heads, the KV
        heads and the MLP width (no KV-head replication)."""
        return all(n % tp == 0 for n in (self.num_heads, self.num_kv_heads, self.intermediate_size))

    def activation_bytes(self, tp: int, num_tokens: int, num_seqs: int) -> int:
        """Peak activation memory of one GPU of a TP group running one forward of `num_tokens`
        tokens from `num_seqs` sequences: the residual stream and its normed copy (2h), this
        rank's q/k/v and attention output ((2h + 2·kv)/tp), the MLP's up/gate/act ((2 or 3)·ffn/tp)
        in the model dtype, plus fp32 logits of the last token of each sequence. Counts one
        layer's live tensors (the engine frees them layer by layer)."""
        kv = self.num_kv_heads * self.head_dim
        mlp = (3 if self.ffn == "gated" else 2) * self.intermediate_size
        per_token = 2 * self.hidden_size + (2 * self.hidden_size + 2 * kv + mlp) // tp
        return num_tokens * per_token * self.dtype_bytes + num_seqs * self.vocab_size * 4

    def valid_pp(self, pp: int) -> bool:
        return self.num_layers % pp == 0


def model_catalog() -> dict[str, ModelSpec]:
    text = resources.files("pdserve.placement").joinpath("data/models.yaml").read_text()
    return {name: ModelSpec(name=name, **fields) for name, fields in yaml.safe_load(text).items()}


def from_hf_config(cfg: dict[str, Any], name: str = "model") -> ModelSpec:
    """Llama-family (`num_hidden_layers`, ...) or OPT (`ffn_dim`, `max_position_embeddings`) config."""
    is_opt = cfg.get("model_type") == "opt" or "ffn_dim" in cfg
    heads = cfg["num_attention_heads"]
    return ModelSpec(
        name=name,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        intermediate_size=cfg["ffn_dim"] if is_opt else cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        ffn="mlp" if is_opt else "gated",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", is_opt)),
        max_model_len=cfg.get("max_position_embeddings", 2048),
        hf_name=cfg.get("_name_or_path", ""),
    )


def load_model(name_or_path: str) -> ModelSpec:
    """A catalog name, an HF `config.json`, or a directory holding one."""
    catalog = model_catalog()
    key = name_or_path.lower().removeprefix("facebook/")
    if key in catalog:
        return catalog[key]
    for spec in catalog.values():
        if spec.hf_name.lower() == name_or_path.lower():
            return spec
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return from_hf_config(json.loads(path.read_text()), name=path.parent.name or path.stem)
    raise ValueError(f"model: unknown {name_or_path!r} (known: {', '.join(catalog)}; or an HF config.json)")
