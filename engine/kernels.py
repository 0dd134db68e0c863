"""Native kernels for CPU fp32 (engine/kernels.c, attention_kernels.c, kernels.h): the matrix-vector
product at batch 1-16 over panel-packed weights, decode attention over the paged cache, causal
attention of a prompt's new queries, and RMSNorm, rotary and silu·mul at any row count (torch
composites of 3-5 ops each: at one row their per-op cost, at a prefill's thousands their passes
over memory and torch's scalar exp, are what they spend).

Why our own: at batch 1 a decode step is one read of the weights, so the GEMV's bandwidth sets the
step time, and every maintained fp32 GEMV measured on the development machine (AMD EPYC, AVX-512)
streams the weights at ~1.5x the time of a plain reduction over the same bytes (MKL's sgemv behind
`F.linear`, oneDNN's linear on the plain and on its reordered weight, MKL's packed GEMM;
BENCHMARKS.md §1). Decode attention over a paged cache has no maintained CPU op in PyTorch (its
sparse composite costs ~30 µs of dispatch per layer at batch 1 for microseconds of work). For a
prompt, torch's CPU flash attention (SDPA, causal, grouped-query) ran SmolLM2's 9 heads of 64 dims
at ~40 GFLOP/s here; the native kernel, register-tiled like the GEMV, takes ~0.35x its time.

The source is compiled on first use with the machine's C compiler (`cc`, -O3 -march=native) into
the pdserve cache and loaded with ctypes; the binary's name hashes the source, the flags and the
CPU's feature flags, so a shared cache never hands one machine another's binary. No compiler, a
failed build, PDSERVE_NATIVE_KERNELS=0, or a probe that disagrees with torch: `load()` is None,
`load_error()` says why (logged once as a warning), and the engine runs oneDNN / F.linear and the
torch attention instead; the model's `Matmul.name` and the runner's `native_kernels` say which.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 16  # rows the packed GEMV takes: ahead of oneDNN up to ~24 rows here, behind it from ~32 (BENCHMARKS.md §1)
_SOURCES = tuple(Path(__file__).with_name(n) for n in ("kernels.h", "kernels.c", "attention_kernels.c"))
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"]
_EXTRA_FLAGS = ([["-DPD_MVEC", "-lmvec", "-lm"]] if platform.machine() in ("x86_64", "AMD64") else []) + [["-lm"]]

_lock = threading.Lock()
_loaded: object = False  # False: not tried yet; None: unavailable; else Kernels
_error: str | None = None
_VOID, _LONG = ctypes.c_void_p, ctypes.c_long


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cache: Path) -> Path:
    """The compiled library, built once per (source, flags, compiler, CPU); raises RuntimeError saying why not."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    sources = {p.name: p.read_text() for p in _SOURCES}
    parts = [*sources.values(), " ".join(_FLAGS), repr(_EXTRA_FLAGS), cc, platform.machine(), _cpu_signature()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    lib = cache / f"pd_kernels_{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for name, text in sources.items():
            (Path(tmp) / name).write_text(text)
        srcs, out = [str(Path(tmp) / n) for n in sources if n.endswith(".c")], Path(tmp) / "kernels.so"
        for extra in _EXTRA_FLAGS:  # with glibc's vector math where it links, else without
            done = subprocess.run([cc, *_FLAGS, *srcs, "-o", str(out), *extra], capture_output=True, timeout=120)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} failed: {done.stderr.decode(errors='replace')[-500:]}")
        os.replace(out, lib)  # atomic: concurrent builders each install a complete file
    return lib


def _fn(lib: ctypes.CDLL, name: str, restype: type | None, *argtypes: type) -> ctypes._CFuncPtr:
    f = getattr(lib, name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


class Kernels:
    """The loaded library's functions (ctypes), argument types set, and the packed-weight cache."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.panel_rows = int(_fn(lib, "pd_panel_rows", _LONG)())
        self.pack = _fn(lib, "pd_pack_f32", None, _VOID, _VOID, _LONG, _LONG)
        self.gemv = _fn(lib, "pd_gemv_packed_f32", None, *[_VOID] * 5, *[_LONG] * 3)
        self.rmsnorm = _fn(lib, "pd_rmsnorm_f32", None, _VOID, _VOID, ctypes.c_float, _VOID, _LONG, _LONG)
        self.rope = _fn(lib, "pd_rope_f32", None, _VOID, _LONG, _VOID, _VOID, _VOID, _LONG, _LONG, _LONG)
        self.silu_mul = _fn(lib, "pd_silu_mul_f32", None, _VOID, _VOID, _LONG, _LONG)
        self.attention = _fn(lib, "pd_decode_attention_f32", _LONG, _VOID, _LONG, _VOID, _LONG, _VOID, _LONG, _VOID,
                             _VOID, _VOID, _LONG, _VOID, *[_LONG] * 5, ctypes.c_float, _VOID)
        self.prefill_attention = _fn(lib, "pd_prefill_attention_f32", _LONG, _VOID, _LONG, _VOID, _LONG, _VOID, _LONG,
                                     *[_LONG] * 5, ctypes.c_float, _VOID, _LONG)
        self.decode_layer = _fn(lib, "pd_decode_layer_f32", _LONG, _VOID, _VOID, _VOID)
        self.decode_layer_work = _fn(lib, "pd_decode_layer_work", _LONG, _VOID)
        self._packed: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}

    def packed(self, w: torch.Tensor) -> torch.Tensor:
        """w (N, K) repacked into (ceil(N / panel_rows), K, panel_rows) panels; packed on first use,
        repacked when w changes in place, dropped when w is freed (a copy beside the plain weight)."""
        key, stamp = id(w), (w._version, w.data_ptr(), tuple(w.shape))  # `.data =` swaps keep the version
        hit = self._packed.get(key)
        if hit is not None and hit[0]() is w and hit[1] == stamp:
            return hit[2]
        n, k = w.shape
        with torch.inference_mode(False):
            wp = torch.empty(-(-n // self.panel_rows), k, self.panel_rows, dtype=torch.float32)
        self.pack(w.data_ptr(), wp.data_ptr(), n, k)
        self._packed[key] = (weakref.ref(w, lambda _, cache=self._packed, key=key: cache.pop(key, None)),
                             stamp, wp)
        return wp


def _probe(k: Kernels) -> bool:
    gen = torch.Generator().manual_seed(0)
    F = torch.nn.functional
    for m, n, kk in ((1, 7, 19), (3, 70, 32), (4, 9, 64)):
        x, w, b, a = (torch.randn(s, generator=gen) for s in ((m, kk), (n, kk), (n,), (m, n)))
        if not torch.allclose(linear_small(k, x, w, b, a), F.linear(x, w, b) + a, atol=1e-4, rtol=1e-4):
            return False
        if not torch.allclose(rms_norm(k, x, w[0], 1e-6), F.rms_norm(x, (kk,), w[0], 1e-6), atol=1e-5, rtol=1e-5):
            return False
    x, cos, sin = (torch.randn(s, generator=gen) for s in ((2, 3, 8), (2, 1, 8), (2, 1, 8)))
    want = x * cos + torch.cat((x[..., 4:], x[..., :4]), -1) * sin
    gu = torch.randn(3, 10, generator=gen)
    q, kv = torch.randn(5, 2, k.panel_rows, generator=gen), torch.randn(2, 7, 1, k.panel_rows, generator=gen)
    att, mask = torch.empty_like(q), torch.ones(5, 7, dtype=torch.bool).tril(2)  # the last 5 of 7 positions
    prefill_attention(k, q, kv[0], kv[1], att)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), kv[0].transpose(0, 1).expand(2, 7, -1),
                                          kv[1].transpose(0, 1).expand(2, 7, -1), attn_mask=mask)
    return (torch.allclose(rope(k, x, cos, sin), want, atol=1e-6, rtol=1e-6)
            and torch.allclose(silu_mul(k, gu), F.silu(gu[:, :5]) * gu[:, 5:], atol=1e-6, rtol=1e-5)
            and torch.allclose(att, sdpa.transpose(0, 1), atol=1e-5, rtol=1e-5))


def load() -> Kernels | None:
    """The native kernels, or None where they cannot be built here (then `load_error()` says why).
    Built and probed once per process."""
    global _loaded, _error
    if _loaded is not False:
        return _loaded  # type: ignore[return-value]
    with _lock:
        if _loaded is not False:
            return _loaded  # type: ignore[return-value]
        found, error = None, None
        if os.environ.get("PDSERVE_NATIVE_KERNELS", "1") == "0":
            error = "disabled by PDSERVE_NATIVE_KERNELS=0"
        elif platform.machine() not in ("x86_64", "AMD64", "aarch64"):
            error = f"untested CPU architecture {platform.machine()}"
        else:
            try:
                from pdserve.models import cache_root

                k = Kernels(ctypes.CDLL(str(_build(cache_root() / "kernels"))))
                found = k if _probe(k) else None
                error = None if found else "the built kernels disagree with torch on the probe"
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                error = f"{type(e).__name__}: {e}"
        if error is not None:
            log.warning("native CPU kernels unavailable (%s): decode runs oneDNN / torch ops instead, slower", error)
        _loaded, _error = found, error
        return found


def load_error() -> str | None:
    """Why `load()` returned None (None when it has not been tried or succeeded)."""
    return _error


def linear_small(k: Kernels, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                 add: torch.Tensor | None = None) -> torch.Tensor:
    """x (M <= MAX_ROWS, K) @ w (N, K).T [+ bias] [+ add (M, N)] over w's packed copy; every
    tensor fp32, CPU and contiguous (the caller checks)."""
    m, kk = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    k.gemv(x.data_ptr(), k.packed(w).data_ptr(), 0 if bias is None else bias.data_ptr(),
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


def decode_attention(k: Kernels, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     tables: torch.Tensor, ctx: torch.Tensor, new_kv: tuple[torch.Tensor, torch.Tensor] | None,
                     ) -> torch.Tensor:
    """One query per sequence, q (n, h_q, d) with contiguous rows → (n, h_q, d), reading the paged caches
    (num_blocks, block_size, h_kv, d) in place through `tables` (n, max_blocks) and `ctx` (n,)
    (int64, contiguous). `new_kv` = (k, v), each (n, h_kv, d) with contiguous rows: written at
    position ctx - 1 first. fp32 CPU; raises MemoryError when the score workspace cannot be had."""
    n, h_q, d = q.shape
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.dtype == k_cache.dtype == torch.float32
    out = torch.empty(n, h_q, d, dtype=q.dtype)
    q = _rows_contiguous(q)
    kn, vn = (_rows_contiguous(t) for t in new_kv) if new_kv is not None else (None, None)
    rc = k.attention(q.data_ptr(), q.stride(0), 0 if kn is None else kn.data_ptr(), 0 if kn is None else kn.stride(0),
                     0 if vn is None else vn.data_ptr(), 0 if vn is None else vn.stride(0),
                     k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1], ctx.data_ptr(),
                     block_size, n, h_q, h_kv, d, d**-0.5, out.data_ptr())
    if rc != 0:
        raise MemoryError("native decode attention: no memory for the score workspace")
    return out


def prefill_ok(k: Kernels, q: torch.Tensor) -> bool:
    """The prompt-attention kernel takes this q (T, h_q, d): fp32 CPU, d a multiple of the panel width."""
    return q.dtype == torch.float32 and q.device.type == "cpu" and q.shape[2] % k.panel_rows == 0


def prefill_attention(k: Kernels, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, out: torch.Tensor) -> None:
    """Causal attention of one sequence's new queries q (Lq, h_q, d) over its keys / values (Lk, h_kv, d),
    the queries being its last Lq positions, into out (Lq, h_q, d); rows may be strided, each
    row's heads contiguous (else copied). fp32 CPU, d % k.panel_rows == 0 (`prefill_ok`);
    raises MemoryError when the K^T workspace cannot be had."""
    (lq, h_q, d), lk = q.shape, keys.shape[0]
    q, keys, vals = (_rows_contiguous(t) for t in (q, keys, vals))
    assert out.stride(2) == 1 and out.stride(1) == d and lk >= lq
    rc = k.prefill_attention(q.data_ptr(), q.stride(0), keys.data_ptr(), keys.stride(0), vals.data_ptr(),
                             vals.stride(0), lq, lk, h_q, keys.shape[1], d, d**-0.5, out.data_ptr(), out.stride(0))
    if rc != 0:
        raise MemoryError("native prefill attention: no memory for the K^T workspace")


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x (n, h, d) whose rows may be strided but each row's h * d values contiguous (else a copy)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()
