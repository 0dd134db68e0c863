"""Sharded loading: a TP rank reads only its slices, so its peak memory is its shard, not the stage.

The model (random Llama shape, 8 layers, hidden 512, MLP 2048, 128 MiB in fp32) is written with
safetensors directly; each measurement loads it in a fresh process and reports the peak RSS above
the RSS right before the load (the loader reads with pread, no mmap, so RSS is what it holds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine.engine import load_model

SHAPE = {"vocab_size": 1024, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 256,
         "rms_norm_eps": 1e-6, "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False,
         "torch_dtype": "float32"}


def _write_checkpoint(path: Path) -> int:
    from safetensors.torch import save_file

    h, i, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(SHAPE["vocab_size"], h, generator=g),
                                  "lm_head.weight": torch.randn(SHAPE["vocab_size"], h, generator=g),
                                  "model.norm.weight": torch.ones(h)}
    for layer in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            t[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.02
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
    path.mkdir()
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(SHAPE))
    return sum(x.numel() * x.element_size() for x in t.values())


_MEASURE = """
import json, sys, torch
from pdserve.config import EngineConfig
from pdserve.engine.engine import load_model
from pdserve.engine.model import LlamaForCausalLM, ModelConfig
import pdserve.models, pdserve.tokenizer
with torch.device("meta"):  # torch imports its meta kernels (~70 MB) on first use: not the load's memory
    LlamaForCausalLM(ModelConfig(64, 64, 128, 1, 4, 2, 16), 16)
def status_kb(key):  # VmHWM, not ru_maxrss: that one keeps the forking parent's peak across exec
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])
before = status_kb("VmRSS")
cfg = EngineConfig(device="cpu", max_model_len=256)
net, _, _ = load_model(sys.argv[1], cfg, None, int(sys.argv[2]), int(sys.argv[3]))
peak = status_kb("VmHWM")
params = sum(p.numel() * p.element_size() for p in net.parameters())
print(json.dumps({"peak_mb": (peak - before) / 1024, "param_mb": params / 2**20}))
"""


def _measure(path: Path, tp_rank: int, tp_size: int) -> dict[str, float]:
    # A fixed mmap threshold: glibc's dynamic one otherwise keeps freed buffers (a strided read's
    # staging) in the heap, where RSS cannot tell them from live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(tp_rank), str(tp_size)],
                         capture_output=True, text=True, timeout=120, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_tp2_rank_peaks_at_about_half_the_memory_of_tp1(tmp_path: Path) -> None:
    nbytes = _write_checkpoint(tmp_path / "ckpt")
    tp1 = _measure(tmp_path / "ckpt", 0, 1)
    tp2 = [_measure(tmp_path / "ckpt", r, 2) for r in (0, 1)]
    assert tp1["param_mb"] == pytest.approx(nbytes / 2**20, rel=1e-6)
    # replicated: embeddings, lm_head, norms (4 MiB of 128 MiB); the layers split in two
    assert tp2[0]["param_mb"] == pytest.approx(tp1["param_mb"] / 2 + 2.0, rel=0.02)
    # The whole-stage loader peaked at ~2x the weights plus the mapped file (a random fp32 init, the
    # fp32 dict; 138 MB at half this size) on every rank. Reading slices into a meta-built model peaks at the
    # rank's weights plus a constant (12-22 MB of allocator and code pages here) that does not scale.
    for rank in (tp1, *tp2):
        assert rank["peak_mb"] - rank["param_mb"] < 24, rank
    for rank in tp2:
        assert rank["peak_mb"] < 0.7 * tp1["peak_mb"], (rank, tp1)


def test_a_sharded_rank_holds_its_contiguous_slice_of_each_weight(tiny_llama_dir: Path) -> None:
    cfg = EngineConfig(device="cpu", max_model_len=64)
    full, _, _ = load_model(str(tiny_llama_dir), cfg)
    for rank in (0, 1):
        part, _, _ = load_model(str(tiny_llama_dir), cfg, None, rank, 2)
        assert all(p.device.type == "cpu" for p in part.parameters())  # nothing left on meta
        a, b = full.model.layers["0"], part.model.layers["0"]
        n = b.self_attn.k_proj.out_features
        assert n * 2 == a.self_attn.k_proj.out_features
        torch.testing.assert_close(b.self_attn.k_proj.weight, a.self_attn.k_proj.weight[rank * n:(rank + 1) * n])
        c = b.mlp.down_proj.in_features
        torch.testing.assert_close(b.mlp.down_proj.weight, a.mlp.down_proj.weight[:, rank * c:(rank + 1) * c])
        torch.testing.assert_close(part.lm_head.weight, full.lm_head.weight)  # replicated
        torch.testing.assert_close(part.rope.cos, full.rope.cos)


def test_a_checkpoint_that_does_not_fit_the_config_names_the_tensor(tmp_path: Path) -> None:
    nbytes = _write_checkpoint(tmp_path / "ckpt")
    assert nbytes > 0
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**SHAPE, "intermediate_size": 1024}))
    with pytest.raises(ValueError, match=r"model: model\.layers\.0\.mlp\.gate_proj\.weight is \[2048, 512\]"):
        load_model(str(tmp_path / "ckpt"), EngineConfig(device="cpu", max_model_len=64))

