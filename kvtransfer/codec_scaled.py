"""`int8` and `fp8` codecs: 8-bit codes with fp16 scales, keys per channel, values per (token, head).

Keys carry per-channel outliers (KIVI's observation), so one scale per (128-token group, head,
channel) tracks them; values get one scale per (token, kv-head). With head_dim 64 that is
8 + 16/128 bits per key and 8 + 16/64 per value: 1.96x smaller than bf16. `int8` is symmetric
round-to-nearest in [-127, 127] (the default when compressing); `fp8` casts x / scale to e4m3 in
[-448, 448], useful when the decode cache is fp8 itself.

Parts: k codes (T, H, D), k scales (ceil(T/128), H, D) fp16, v codes (T, H, D), v scales (T, H, 1) fp16.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from pdserve.kvtransfer import quant

KEY_GROUP = 128


def _int8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return quant.quant_sym(x, scale, 127)


def _fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale.clamp_min(1e-8)).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)


class ScaledCodec:
    def __init__(self, name: str, code_dtype: torch.dtype, qmax: float,
                 to_codes: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.name, self.code_dtype, self.qmax, self._codes = name, code_dtype, qmax, to_codes

    def encode(self, slab: torch.Tensor) -> list[torch.Tensor]:
        k, v = slab[0].float(), slab[1].float()  # each (T, H, D)
        ks = quant.absmax_per_channel(k, KEY_GROUP, self.qmax)  # (ceil(T/G), H, D)
        vs = quant.absmax_per_token(v, self.qmax)  # (T, H, 1)
        kq = self._codes(k, quant.expand_groups(ks, KEY_GROUP, k.shape[0]))
        vq = self._codes(v, vs.float())
        return [kq, ks, vq, vs]

    def decode(self, parts: Sequence[torch.Tensor], shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        _, t, h, d = shape
        expect = [(self.code_dtype, (t, h, d)), (torch.float16, (-(-t // KEY_GROUP), h, d)),
                  (self.code_dtype, (t, h, d)), (torch.float16, (t, h, 1))]
        if [(p.dtype, tuple(p.shape)) for p in parts] != expect:
            raise ValueError(f"{self.name}: parts do not match slab {list(shape)}")
        kq, ks, vq, vs = parts
        k = kq.float() * quant.expand_groups(ks, KEY_GROUP, t)
        v = vq.float() * vs.float()
        return torch.stack((k, v)).to(dtype)  # (2, T, H, D)

    def wire_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        _, t, h, d = shape
        return 2 * t * h * d * self.code_dtype.itemsize + math.ceil(t / KEY_GROUP) * h * d * 2 + t * h * 2


def int8_codec() -> ScaledCodec:
    return ScaledCodec("int8", torch.int8, 127.0, _int8_codes)


def fp8_codec() -> ScaledCodec:
    return ScaledCodec("fp8", torch.float8_e4m3fn, 448.0, _fp8_codes)
