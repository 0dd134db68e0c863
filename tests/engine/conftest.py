"""Tiny random-weight Hugging Face models (2 layers, hidden 64, vocab 128, seed 0) for engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _save_tiny(kind: str, root: Path) -> tuple[Path, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    path = root / kind
    model.save_pretrained(path)
    return path, model.eval()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_hf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """(directory, transformers model) for a tiny GQA Llama and a tiny Qwen2 (qkv bias, tied embeddings)."""
    return _save_tiny(request.param, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny"))
