"""Small native kernels for a decode step at batch 1-4 on CPU, fp32: the matrix-vector product,
and at those few rows RMSNorm, rotary and silu·mul (torch composites of 3-5 ops each, whose
per-op cost, not their bytes, is what they spend at one row).

Why our own: at batch 1 a decode step is one read of the weights, so the GEMV's bandwidth sets the
step time. On the development machine (AMD EPYC, AVX-512) every maintained fp32 GEMV we measured
streams the weights at ~1.5x the time of a plain reduction over the same bytes (MKL's sgemm/sgemv
behind `F.linear`, oneDNN's linear on the plain and on the reordered weight, MKL's packed GEMM,
`x @ W.T` on a transposed copy; BENCHMARKS.md §1), which alone would put a batch-1 step above 1.3x
the memory roofline. The loop below (eight weight rows streamed at once, one vector accumulator
each, written with the compiler's portable vector extensions) reads at ~1.1x a reduction.

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
#include <string.h>

/* GCC/Clang vector extensions: one AVX-512 register, two AVX2 or four NEON registers. */
#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
#define ROWS 8 /* weight rows streamed at once: 8 measured ~1.1x a plain reduction, 4 ~1.4x */

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline float vsum(vf v) { float s = 0.f; for (int i = 0; i < VL; i++) s += v[i]; return s; }

/* y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) (+ add[m, n]) for m < M; row-major, contiguous. */
void pd_gemv_f32(const float *restrict x, const float *restrict w, const float *restrict bias,
                 const float *restrict add, float *restrict y, long M, long N, long K) {
    long kv = K - K % VL, n = 0;
    for (; n + ROWS <= N; n += ROWS) {
        const float *wr = w + n * K;
        for (long m = 0; m < M; m++) { /* rows m > 0 find these weight rows in cache */
            const float *xm = x + m * K;
            vf acc[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = (vf){0};
            for (long k = 0; k < kv; k += VL) {
                vf xv = vload(xm + k);
                for (int r = 0; r < ROWS; r++) acc[r] += vload(wr + r * K + k) * xv;
            }
            for (int r = 0; r < ROWS; r++) {
                float s = vsum(acc[r]);
                for (long k = kv; k < K; k++) s += wr[r * K + k] * xm[k];
                y[m * N + n + r] = s;
            }
        }
    }
    for (; n < N; n++) {
        const float *wn = w + n * K;
        for (long m = 0; m < M; m++) {
            const float *xm = x + m * K;
            float a = 0.f;
            for (long k = 0; k < K; k++) a += wn[k] * xm[k];
            y[m * N + n] = a;
        }
    }
    if (bias) for (long m = 0; m < M; m++) for (long j = 0; j < N; j++) y[m * N + j] += bias[j];
    if (add) for (long m = 0; m < M; m++) for (long j = 0; j < N; j++) y[m * N + j] += add[m * N + j];
}

/* Rotary embedding of T tokens x H heads x D dims (x rows `stride` floats apart, y contiguous):
   y = x * cos + swap_halves(x) * sin_signed, with cos / sin_signed (T, D). */
void pd_rope_f32(const float *restrict x, long stride, const float *restrict cos_, const float *restrict sin_,
                 float *restrict y, long T, long H, long D) {
    long half = D / 2;
    for (long t = 0; t < T; t++) {
        const float *c = cos_ + t * D, *s = sin_ + t * D;
        for (long h = 0; h < H; h++) {
            const float *xh = x + t * stride + h * D;
            float *yh = y + (t * H + h) * D;
            for (long i = 0; i < half; i++) {
                float a = xh[i] * c[i], b = xh[i + half] * s[i];
                yh[i] = a + b;
            }
            for (long i = half; i < D; i++) {
                float a = xh[i] * c[i], b = xh[i - half] * s[i];
                yh[i] = a + b;
            }
        }
    }
}

/* y[m, j] = silu(g[m, j]) * u[m, j] with g = gu[m, :I], u = gu[m, I:] (gu rows 2I floats). */
void pd_silu_mul_f32(const float *restrict gu, float *restrict y, long M, long I) {
    for (long m = 0; m < M; m++) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float *ym = y + m * I;
        for (long j = 0; j < I; j++) ym[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
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
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC", "-lm"]

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

        self.rope = lib.pd_rope_f32
        self.rope.restype = None
        self.rope.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_long, ctypes.c_long, ctypes.c_long]
        self.silu_mul = lib.pd_silu_mul_f32
        self.silu_mul.restype = None
        self.silu_mul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long]


def _probe(k: Kernels) -> bool:
    gen = torch.Generator().manual_seed(0)
    for m, n, kk in ((1, 7, 19), (3, 12, 32), (4, 9, 64)):
        x, w, b, a = (torch.randn(s, generator=gen) for s in ((m, kk), (n, kk), (n,), (m, n)))
        if not torch.allclose(linear_small(k, x, w, b, a), torch.nn.functional.linear(x, w, b) + a, atol=1e-4, rtol=1e-4):
            return False
        if not torch.allclose(rms_norm(k, x, w[0], 1e-6), torch.nn.functional.rms_norm(x, (kk,), w[0], 1e-6),
                              atol=1e-5, rtol=1e-5):
            return False
    x, cos, sin = (torch.randn(s, generator=gen) for s in ((2, 3, 8), (2, 1, 8), (2, 1, 8)))
    want = x * cos + torch.cat((x[..., 4:], x[..., :4]), -1) * sin
    gu = torch.randn(3, 10, generator=gen)
    return (torch.allclose(rope(k, x, cos, sin), want, atol=1e-6, rtol=1e-6)
            and torch.allclose(silu_mul(k, gu), torch.nn.functional.silu(gu[:, :5]) * gu[:, 5:], atol=1e-6, rtol=1e-5))


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


def rope(k: Kernels, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """model.apply_rotary natively: x (T, H, D) whose heads are contiguous within a token (rows may
    be strided), cos / sin_signed (T, 1, D) contiguous; fp32 CPU."""
    T, H, D = x.shape
    y = torch.empty(T, H, D, dtype=x.dtype)
    k.rope(x.data_ptr(), x.stride(0), cos.data_ptr(), sin_signed.data_ptr(), y.data_ptr(), T, H, D)
    return y


def silu_mul(k: Kernels, gu: torch.Tensor) -> torch.Tensor:
    """silu(gu[:, :I]) * gu[:, I:] for gu (M, 2I) contiguous, fp32 CPU."""
    m, two_i = gu.shape
    y = torch.empty(m, two_i // 2, dtype=gu.dtype)
    k.silu_mul(gu.data_ptr(), y.data_ptr(), m, two_i // 2)
    return y
