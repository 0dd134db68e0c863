"""Small native kernels for a decode step at batch 1-4 on CPU, fp32: the matrix-vector product
(and RMSNorm, a torch composite of five ops at one row).

Why our own: at batch 1 a decode step is one read of the weights, so the GEMV's bandwidth sets the
step time. On the development machine (AMD EPYC, AVX-512) every maintained fp32 GEMV we measured
streams the weights at ~1.5x the time of a plain reduction over the same bytes (MKL's sgemm/sgemv
behind `F.linear`, oneDNN's linear on the plain and on the reordered weight, MKL's packed GEMM,
`x @ W.T` on a transposed copy; BENCHMARKS.md §1), which alone would put a batch-1 step above 1.3x
the memory roofline. The loop below (four weight rows at a time, each row streamed once, the
reduction vectorised by the compiler through `omp simd`) reads at ~1.05x a reduction.

The source is compiled on first use with the machine's C compiler (`cc`, -O3 -march=native) into
the pdserve cache and loaded with ctypes; the binary's name hashes the source, the flags and the
CPU's feature flags, so a shared cache never hands one machine another's binary. No compiler, a
failed build, PDSERVE_NATIVE_KERNELS=0, or a probe that disagrees with torch: `load()` is None
and the engine uses oneDNN / F.linear as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

MAX_ROWS = 4  # batch sizes the kernel takes; larger ones go to oneDNN (compute, not bandwidth, then)

_SOURCE = r"""
#include <math.h>
#include <stddef.h>

/* y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) (+ add[m, n]) for m < M <= 4; row-major, contiguous. */
void pd_gemv_f32(const float *restrict x, const float *restrict w, const float *restrict bias,
                 const float *restrict add, float *restrict y, long M, long N, long K) {
    long n = 0;
    for (; n + 4 <= N; n += 4) {
        const float *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        for (long m = 0; m < M; m++) {  /* rows m > 0 find the 4 weight rows in L1 */
            const float *xm = x + m * K;
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (long k = 0; k < K; k++) {
                float xv = xm[k];
                a0 += w0[k] * xv; a1 += w1[k] * xv; a2 += w2[k] * xv; a3 += w3[k] * xv;
            }
            float *ym = y + m * N + n;
            ym[0] = a0; ym[1] = a1; ym[2] = a2; ym[3] = a3;
        }
    }
    for (; n < N; n++) {
        const float *wn = w + n * K;
        for (long m = 0; m < M; m++) {
            const float *xm = x + m * K;
            float a = 0.f;
#pragma omp simd reduction(+ : a)
            for (long k = 0; k < K; k++) a += wn[k] * xm[k];
            y[m * N + n] = a;
        }
    }
    if (bias) for (long m = 0; m < M; m++) for (long j = 0; j < N; j++) y[m * N + j] += bias[j];
    if (add) for (long m = 0; m < M; m++) for (long j = 0; j < N; j++) y[m * N + j] += add[m * N + j];
}

/* y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, rows of K floats (HF's LlamaRMSNorm in fp32). */
void pd_rmsnorm_f32(const float *restrict x, const float *restrict w, float eps, float *restrict y, long M, long K) {
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float *ym = y + m * K;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (long k = 0; k < K; k++) ss += xm[k] * xm[k];
        float r = 1.0f / sqrtf(ss / (float)K + eps);
#pragma omp simd
        for (long k = 0; k < K; k++) ym[k] = (xm[k] * r) * w[k];
    }
}
"""
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC", "-lm"]

_lock = threading.Lock()
_loaded: object = False  # False: not tried yet; None: unavailable; else Kernels


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cache: Path) -> Path | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_FLAGS), cc, platform.machine(), _cpu_signature()])
                         .encode()).hexdigest()[:16]
    lib = cache / f"pd_gemv_{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / "gemv.c", Path(tmp) / "gemv.so"
        src.write_text(_SOURCE)
        done = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, timeout=120)
        if done.returncode != 0:
            return None
        os.replace(out, lib)  # atomic: concurrent builders each install a complete file
    return lib


class Kernels:
    """The loaded library's functions (ctypes), argument types set."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.gemv = lib.pd_gemv_f32
        self.gemv.restype = None
        self.gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3
        self.rmsnorm = lib.pd_rmsnorm_f32
        self.rmsnorm.restype = None
        self.rmsnorm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
                                 ctypes.c_long, ctypes.c_long]

    def __call__(self, *args: object) -> None:  # the GEMV, as `linear_small` calls it
        self.gemv(*args)


def _probe(k: Kernels) -> bool:
    gen = torch.Generator().manual_seed(0)
    for m, n, kk in ((1, 7, 19), (3, 12, 32), (4, 9, 64)):
        x, w, b, a = (torch.randn(s, generator=gen) for s in ((m, kk), (n, kk), (n,), (m, n)))
        if not torch.allclose(linear_small(k, x, w, b, a), torch.nn.functional.linear(x, w, b) + a, atol=1e-4, rtol=1e-4):
            return False
        if not torch.allclose(rms_norm(k, x, w[0], 1e-6), torch.nn.functional.rms_norm(x, (kk,), w[0], 1e-6),
                              atol=1e-5, rtol=1e-5):
            return False
    return True


def load() -> Kernels | None:
    """The native kernels (`linear_small`, `rms_norm` take it), or None where they cannot be built
    here. Built and probed once per process."""
    global _loaded
    if _loaded is not False:
        return _loaded  # type: ignore[return-value]
    with _lock:
        if _loaded is not False:
            return _loaded  # type: ignore[return-value]
        found = None
        if os.environ.get("PDSERVE_NATIVE_KERNELS", "1") != "0" and platform.machine() in ("x86_64", "AMD64", "aarch64"):
            try:
                from pdserve.models import cache_root

                lib = _build(cache_root() / "kernels")
                if lib is not None:
                    k = Kernels(ctypes.CDLL(str(lib)))
                    found = k if _probe(k) else None
            except (OSError, subprocess.SubprocessError, AttributeError):
                found = None
        _loaded = found
        return found


def linear_small(k: Kernels, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                 add: torch.Tensor | None = None) -> torch.Tensor:
    """x (M <= MAX_ROWS, K) @ w (N, K).T [+ bias] [+ add (M, N)] with the native kernel; every
    tensor fp32, CPU and contiguous (the caller checks)."""
    m, kk = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    k.gemv(x.data_ptr(), w.data_ptr(), 0 if bias is None else bias.data_ptr(),
           0 if add is None else add.data_ptr(), y.data_ptr(), m, n, kk)
    return y


def rms_norm(k: Kernels, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of x (M, K) with weight w (K,); fp32, CPU, contiguous (the caller checks)."""
    y = torch.empty_like(x)
    k.rmsnorm(x.data_ptr(), w.data_ptr(), eps, y.data_ptr(), x.shape[0], x.shape[1])
    return y
