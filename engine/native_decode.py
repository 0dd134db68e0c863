"""NativeDecode: an all-decode step at a few rows (batch 1-16 on CPU fp32) run one native call per
decoder layer (engine/kernels.c `pd_decode_layer_f32`) instead of ~10 torch/ctypes calls.

At batch 1 the step is one read of the weights (~0.5 ms of it per SmolLM2 layer), and the calls
around each kernel (tensor allocation, dispatch, argument checks) cost tens of microseconds per
layer in Python: a batch-1 SmolLM2 step measured 1.27x the weight read with them, 1.10x with the
layer in one call (BENCHMARKS.md §1). The layer runs
the same kernels in the same order as DecoderLayer.forward's native path, so it computes the
same numbers (tests/engine/test_native_decode.py holds it to that path and to the torch one).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from pdserve.engine import kernels

if TYPE_CHECKING:
    from pdserve.engine.layers import DecoderLayer, StepContext

_P, _L = ctypes.c_void_p, ctypes.c_long


class _Step(ctypes.Structure):  # pd_step in engine/kernels.c, field for field
    _fields_ = [("M", _L), ("hidden", _L), ("Hq", _L), ("Hkv", _L), ("D", _L), ("inter", _L),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cos", _P), ("sin", _P),
                ("tables", _P), ("ctx", _P), ("max_blocks", _L), ("block_size", _L), ("work", _P)]


class _Layer(ctypes.Structure):  # pd_layer
    _fields_ = [("norm1", _P), ("norm2", _P), ("qkv", _P), ("qkv_bias", _P), ("o", _P), ("gate_up", _P),
                ("down", _P), ("k_cache", _P), ("v_cache", _P)]


class NativeDecode:
    """One step's fused layers: `for_step` builds it (None when the step does not qualify), then
    `layer(...)` runs each decoder layer, in order, on the residual stream x (M, hidden) in place."""

    def __init__(self, k: kernels.Kernels, step: StepContext, x: torch.Tensor, first: DecoderLayer) -> None:
        attn = first.self_attn
        dec = step.meta.decode
        assert dec is not None
        d = attn.head_dim
        self.k = k
        self.st = _Step(M=x.shape[0], hidden=x.shape[1], Hq=attn.q_proj.out_features // d,
                        Hkv=attn.k_proj.out_features // d, D=d, inter=first.mlp.down_proj.in_features,
                        eps=first.input_layernorm.eps, scale=d**-0.5, cos=step.cos.data_ptr(), sin=step.sin.data_ptr(),
                        tables=dec.tables.data_ptr(), ctx=dec.ctx.data_ptr(), max_blocks=dec.tables.shape[1],
                        block_size=0)
        self.work = torch.empty(int(k.decode_layer_work(ctypes.addressof(self.st))), dtype=torch.float32)
        self.st.work = self.work.data_ptr()
        self._keep = (step.cos, step.sin, dec.tables, dec.ctx)  # the struct points into these

    @classmethod
    def for_step(cls, step: StepContext, x: torch.Tensor, layers: list[DecoderLayer]) -> NativeDecode | None:
        """A NativeDecode when every row is a decode run by the native attention, the rows are few
        enough for the GEMV, x is fp32, and no projection has forward hooks (TP's all-reduce needs
        the per-op path); else None."""
        dec, k = step.meta.decode, step.linear.native
        if (k is None or dec is None or dec.rows is not None or dec.kernels is None or step.meta.static is not None
                or x.dtype != torch.float32 or x.shape[0] > kernels.MAX_ROWS or not layers
                or any(ly.self_attn.o_proj._forward_hooks or ly.mlp.down_proj._forward_hooks for ly in layers)):
            return None
        return cls(k, step, x, layers[0])

    def layer(self, layer: DecoderLayer, k_cache: torch.Tensor, v_cache: torch.Tensor, x: torch.Tensor) -> None:
        """x (M, hidden), contiguous, becomes the layer's output; the step's K/V are written to the caches."""
        attn, mlp, k = layer.self_attn, layer.mlp, self.k
        if not attn.is_fused():
            attn.fuse()
        if not mlp.is_fused():
            mlp.fuse()
        assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the native layer reads (slots, h_kv, d) caches"
        self.st.block_size = k_cache.shape[1]
        ly = _Layer(norm1=layer.input_layernorm.weight.data_ptr(),
                    norm2=layer.post_attention_layernorm.weight.data_ptr(),
                    qkv=k.packed(attn.qkv_weight).data_ptr(),
                    qkv_bias=None if attn.qkv_bias is None else attn.qkv_bias.data_ptr(),
                    o=k.packed(attn.o_proj.weight).data_ptr(), gate_up=k.packed(mlp.gate_up_weight).data_ptr(),
                    down=k.packed(mlp.down_proj.weight).data_ptr(), k_cache=k_cache.data_ptr(),
                    v_cache=v_cache.data_ptr())
        if k.decode_layer(ctypes.addressof(self.st), ctypes.addressof(ly), x.data_ptr()) != 0:
            raise MemoryError("native decode layer: no memory for the attention scores")
