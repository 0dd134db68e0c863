"""Shared test fixtures: model directories and a fake clock.

- `smollm2_dir` (session): the real SmolLM2-135M-Instruct, converted once into the pdserve cache
  (`PDSERVE_CACHE_DIR` or ~/.cache/pdserve) and reused by every later session.
- `tiny_llama_dir` / `tiny_qwen2_dir` (session): random-weight Hugging Face checkpoints saved by
  transformers (seed 0; 2 layers, hidden 64, 4 heads / 2 KV heads of dim 16, vocab 128).
  Llama has untied embeddings, Qwen2 tied ones and q/k/v biases. They hold no tokenizer: tests
  drive them with token ids only. Weights use std 0.1 (not 0.02) so greedy argmaxes are not
  near-ties that float rounding could flip; biases and norm weights are perturbed from 0 and 1
  so loading them wrongly shows.
- `fake_clock`: a clock tests advance by hand.
- `ray_cluster` (session): one local Ray for every test that needs one (starting Ray costs ~6 s and
  ~700 MiB, so never per test).
- `@pytest.mark.gpu` tests are skipped, with the reason, when torch sees no CUDA device. Every other
  test pins `device="cpu"`, so a GPU runner runs the same CPU tests and, in addition, the gpu ones.
Heavy imports (torch, transformers) happen inside the fixtures, so torch-free tests stay fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": 2}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device; torch {torch.__version__} sees none")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from pdserve.models import resolve_model

    return resolve_model("smollm2-135m")


def _save_tiny(out: Path, config_cls: str, model_cls: str, **extra: object) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TINY, **extra)
    model = getattr(transformers, model_cls)(config).to(torch.float32)
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"), "LlamaConfig", "LlamaForCausalLM",
                      rope_theta=10000.0, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny_qwen2"), "Qwen2Config", "Qwen2ForCausalLM",
                      rope_theta=1000000.0, tie_word_embeddings=True)


class FakeClock:
    """Monotonic seconds that move only when told: `clock()` reads, `advance`/`sleep` move it."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, dt_s: float) -> None:
        assert dt_s >= 0, "time never runs backwards"
        self.now_s += dt_s

    sleep = advance


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
