"""Reads a Hugging Face checkpoint directory (one or many .safetensors files) into a model stage.

Only the tensors the stage owns are read (`safe_open` is lazy), so a pipeline stage or a TP
rank never materialises the whole checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from pdserve.engine.model import LlamaForCausalLM


def load_checkpoint(model: LlamaForCausalLM, path: Path) -> None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no .safetensors files in {path}")
    wanted = set(model.state_dict())
    if model.lm_head is not None:
        wanted.add("model.embed_tokens.weight")  # tied embeddings fill lm_head
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name in wanted:
                    tensors[name] = st.get_tensor(name).float()
    model.load_hf_state_dict(tensors)
