"""The native GEMV (engine/kernels.py) and the projection backends (model.Matmul) against F.linear."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine import kernels
from pdserve.engine.model import Matmul


@pytest.fixture(scope="module")
def native():
    fn = kernels.load()
    if fn is None:
        pytest.skip("no C compiler here (the engine falls back to oneDNN / F.linear)")
    return fn


@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16])  # every tile height and grouping
@pytest.mark.parametrize("n, k", [(1, 1), (5, 17), (64, 576), (9, 1536), (130, 40)])
def test_native_gemv_matches_linear(native, m: int, n: int, k: int) -> None:
    """Row counts not a multiple of 4, widths not a multiple of the vector width, bias and add."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w, b, r = (torch.randn(s, generator=gen) for s in ((m, k), (n, k), (n,), (m, n)))
    torch.testing.assert_close(kernels.linear_small(native, x, w), F.linear(x, w), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kernels.linear_small(native, x, w, b, r), F.linear(x, w, b) + r, atol=1e-4, rtol=1e-5)


def test_matmul_dispatch_by_rows_and_layout(native) -> None:
    mm = Matmul("cpu", torch.float32)
    assert mm.native is not None and "native" in mm.name
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    for rows in (1, kernels.MAX_ROWS, kernels.MAX_ROWS + 1, 37):  # native, then oneDNN / F.linear
        x = torch.randn(rows, 32, generator=gen)
        r = torch.randn(rows, 48, generator=gen)
        torch.testing.assert_close(mm(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(mm.add(x, w, b, r), F.linear(x, w, b) + r, atol=1e-4, rtol=1e-5)
    xt = torch.randn(32, 2, generator=gen).t()  # a non-contiguous input takes the library path
    torch.testing.assert_close(mm(xt, w), F.linear(xt, w), atol=1e-4, rtol=1e-5)


def test_matmul_without_native_or_off_cpu32() -> None:
    assert Matmul("cpu", torch.float32, native=False).native is None
    bf = Matmul("cpu", torch.bfloat16)
    assert bf.native is None and not bf.onednn and bf.name == "torch"
    x, w = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(bf(x, w), F.linear(x, w))


@pytest.mark.parametrize("m, k", [(1, 576), (3, 17), (4, 64), (kernels.MAX_ROWS + 23, 576)])
def test_native_rms_norm_matches_torch(native, m: int, k: int) -> None:
    from pdserve.engine.model import RMSNorm

    gen = torch.Generator().manual_seed(k)
    norm = RMSNorm(k, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(k, generator=gen))
    x = 3 * torch.randn(m, k, generator=gen)
    var = x.pow(2).mean(-1, keepdim=True)
    want = x * torch.rsqrt(var + 1e-5) * norm.weight  # transformers' LlamaRMSNorm in fp32
    torch.testing.assert_close(kernels.rms_norm(native, x, norm.weight.detach(), 1e-5), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Matmul("cpu", torch.float32).norm(norm, x), want, atol=1e-5, rtol=1e-5)


def test_native_rotary_and_silu_mul_match_torch(native) -> None:
    from pdserve.engine.model import apply_rotary

    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(3, (4 + 2 + 2) * 16, generator=gen)
    x = qkv[:, : 6 * 16].view(3, 6, 16)  # the q and k heads of a fused projection: rows strided
    cos, sin = torch.randn(3, 1, 16, generator=gen), torch.randn(3, 1, 16, generator=gen)
    mm = Matmul("cpu", torch.float32)
    torch.testing.assert_close(kernels.rope(native, x, cos, sin), apply_rotary(x, cos, sin), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mm.rotary(x, cos, sin), apply_rotary(x, cos, sin), atol=1e-6, rtol=1e-6)
    gu = torch.randn(2, 2 * 1536, generator=gen)
    want = F.silu(gu[:, :1536]) * gu[:, 1536:]
    torch.testing.assert_close(kernels.silu_mul(native, gu), want, atol=1e-6, rtol=1e-5)
    many = torch.randn(kernels.MAX_ROWS + 23, 2 * 1536, generator=gen)  # prefill rows: natively too
    torch.testing.assert_close(mm.silu_mul(many), F.silu(many[:, :1536]) * many[:, 1536:], atol=1e-6, rtol=1e-5)


def test_build_falls_back_to_plain_math_then_reports_a_failed_build(tmp_path, monkeypatch) -> None:
    """Without glibc's vector math the library still builds; when no variant builds, `load()` is
    None and says why (the engine then counts its fallback steps: test_native_decode.py)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(kernels, "_EXTRA_FLAGS", [["-lpd_no_such_library"], ["-lm"]])
    assert kernels._build(tmp_path / "a").exists()
    monkeypatch.setattr(kernels, "_EXTRA_FLAGS", [["-lpd_no_such_library"]])
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "b"))
    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setattr(kernels, "_error", None)
    assert kernels.load() is None
    assert kernels.load_error().startswith("RuntimeError: ") and "failed" in kernels.load_error()
