"""The fused native decode layer (engine/native_decode.py) against the per-op paths on the tiny
models, and the native kernels' fallback being reported and counted, not silent."""

from __future__ import annotations

import logging

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine import kernels
from pdserve.engine import native_decode as nd
from pdserve.engine.batch import Chunk
from pdserve.engine.engine import Engine
from pdserve.engine.profiling import _fake_requests


def _engine(path, **cfg) -> Engine:
    return Engine.from_config(str(path), EngineConfig(device="cpu", block_size=4, kv_cache_memory_gb=0.002,
                                                      max_model_len=256, **cfg))


def _decode_logits(engine: Engine, lens: list[int]) -> torch.Tensor:
    """Prefill each sequence's first len - 1 tokens, then one decode step over all of them: its logits."""
    reqs = _fake_requests(engine, lens, [0] * len(lens))
    try:
        engine.runner.execute([Chunk(r, n - 1) for r, n in zip(reqs, lens)])
        for r, n in zip(reqs, lens):
            r.num_computed_tokens = n - 1
        return engine.runner.execute([Chunk(r, 1) for r in reqs])
    finally:
        for r in reqs:
            engine.free(r)


@pytest.mark.parametrize("lens", [[9], [3, 30], [5, 17, 41, 2], [4 + 3 * i for i in range(16)]])
@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_fused_layer_equals_per_op_paths(model: str, lens: list[int], request: pytest.FixtureRequest,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 1-16 decode: one native call per layer gives bitwise the per-op native kernels' logits,
    and the torch path's (reference attention, oneDNN / F.linear) within fp32 rounding."""
    if kernels.load() is None:
        pytest.skip(f"native kernels unavailable: {kernels.load_error()}")
    path = request.getfixturevalue(model)
    engine = _engine(path)
    calls = []
    real = nd.NativeDecode.for_step
    monkeypatch.setattr(nd.NativeDecode, "for_step", lambda *a: calls.append(real(*a)) or calls[-1])
    fused = _decode_logits(engine, lens)
    assert calls[-1] is not None, "the decode step did not take the fused path"
    monkeypatch.setattr(nd.NativeDecode, "for_step", lambda *a: None)
    per_op = _decode_logits(engine, lens)
    assert torch.equal(fused, per_op)

    monkeypatch.setenv("PDSERVE_NATIVE_KERNELS", "0")
    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setattr(kernels, "_error", None)  # both restored after the test
    plain = _engine(path, attention_backend="reference")
    assert plain.runner.native is None and plain.model.linear is None
    torch.testing.assert_close(_decode_logits(plain, lens), fused, atol=1e-4, rtol=1e-4)
    assert "torch" in plain.model.linear.name or "onednn" in plain.model.linear.name


def test_fallback_is_logged_once_and_counted(tiny_llama_dir, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PDSERVE_NATIVE_KERNELS", "0")
    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setattr(kernels, "_error", None)  # both restored after the test
    with caplog.at_level(logging.WARNING, logger="pdserve.engine.kernels"):
        engine = _engine(tiny_llama_dir)
        kernels.load()
    assert kernels.load_error() == "disabled by PDSERVE_NATIVE_KERNELS=0"
    assert [r.getMessage() for r in caplog.records].count(
        "native CPU kernels unavailable (disabled by PDSERVE_NATIVE_KERNELS=0): decode runs oneDNN / torch ops "
        "instead, slower") == 1
    runner = engine.runner
    assert runner.native is None and runner.native_fallback and runner.num_fallback_steps == 0
    _decode_logits(engine, [6, 11])
    assert runner.num_fallback_steps == 2  # the prefill and the decode step
    assert "native" not in engine.model.linear.name


def test_packed_weight_follows_in_place_changes() -> None:
    k = kernels.load()
    if k is None:
        pytest.skip(f"native kernels unavailable: {kernels.load_error()}")
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(70, 24, generator=gen), torch.randn(2, 24, generator=gen)
    first = k.packed(w)
    assert k.packed(w) is first and first.shape == (2, 24, k.panel_rows)  # cached; 70 rows -> 2 zero-padded panels
    w.mul_(2)  # an in-place change (load_state_dict copies into parameters this way)
    torch.testing.assert_close(kernels.linear_small(k, x, w), x @ w.T, atol=1e-4, rtol=1e-5)
    n = len(k._packed)
    del w, first
    assert len(k._packed) == n - 1  # freed with its weight
