"""Matmul: the projection backend every linear layer of the model calls, picked by device, dtype
and batch rows (native GEMV at a few rows on CPU fp32, oneDNN beyond, F.linear elsewhere)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pdserve.engine import kernels
from pdserve.engine.rotary import apply_rotary

if TYPE_CHECKING:
    from pdserve.engine.layers import RMSNorm


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
        """apply_rotary(x, cos, sin_signed); natively at any row count (one pass instead of torch's
        four ops: ~8x less time at a 1,500-token prefill here)."""
        if (self.native is not None and x.stride(2) == 1
                and x.stride(1) == x.shape[2] and cos.is_contiguous() and sin_signed.is_contiguous()):
            return kernels.rope(self.native, x, cos, sin_signed)
        return apply_rotary(x, cos, sin_signed)

    def _native_elementwise_ok(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        return self.native is not None and x.dim() == 2 and x.is_contiguous() and w.is_contiguous()

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gu = [gate | up] (T, 2 * intermediate); natively at any row count (one
        vectorised pass with glibc's vector expf instead of torch's silu and mul: at a 2,000-token
        prefill ~4x less time here, BENCHMARKS.md §1)."""
        if self._native_elementwise_ok(gu, gu):
            return kernels.silu_mul(self.native, gu)  # type: ignore[arg-type]
        inter = gu.shape[1] // 2
        return F.silu(gu[:, :inter]) * gu[:, inter:]

    def norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        """norm(x), by the native kernel at any row count (one pass instead of torch's five ops)."""
        if self._native_elementwise_ok(x, norm.weight):
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
