"""`int4` and `int4_zstd` codecs: 4-bit asymmetric codes with full-precision sink and recent tokens.

Token interval map of one slab (T tokens):

    [0, SINK)                 window: kept at 16-bit (attention sinks)
    [SINK, T - RECENT)        middle: quantized
    [T - RECENT, T)           window: kept at 16-bit (the tokens decode attends to most; int4 only)

(a slab with T <= SINK + RECENT is all window). "16-bit" is the cache dtype when it is 16-bit and
fp16 for an fp32 cache, so ratios match a bf16 deployment. `int4`: keys per channel over 128-token
groups, values per token over 64-channel groups, codes packed two per byte; its size is a formula.
`int4_zstd` (CacheGen's rung): a 15-level grid (keys per channel over all tokens, values per token
over all heads) and only the sink window; codes are laid out channel-major, keys delta-coded along
tokens, two neighbouring codes per byte, then zstd: ~3.2 bits per code on SmolLM2. Its size depends
on the data, and its format byte (part 0) versions the layout.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import zstandard

from pdserve.kvtransfer import quant

SINK, RECENT = 4, 8
KEY_GROUP, VALUE_GROUP = 128, 64
LEVELS = 16
ZSTD_FORMAT = 2  # int4_zstd's part layout; bumped whenever encode's output changes meaning
ZSTD_LEVELS = 15  # 15 * 15 = 225 pair symbols fit a byte
KEY_DELTA, VALUE_DELTA = 1, 0  # measured on SmolLM2: delta saves ~0.09 b/key code, costs ~0.18 b/value code
ZSTD_LEVEL = 3


def window_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.itemsize <= 2 else torch.float16


def split_window(slab: torch.Tensor, recent: int = RECENT) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, T, H, D) -> window (2, W, H, D) and middle (2, T - W, H, D) per the interval map."""
    t = slab.shape[1]
    if t <= SINK + recent:
        return slab, slab[:, :0]
    return torch.cat((slab[:, :SINK], slab[:, t - recent:]), dim=1), slab[:, SINK:t - recent]


def join_window(window: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
    if middle.shape[1] == 0:
        return window
    return torch.cat((window[:, :SINK], middle, window[:, SINK:]), dim=1)


def _edge_pad(x: torch.Tensor, group: int) -> torch.Tensor:
    """Pad dim 0 to a multiple of `group` by repeating the last row (keeps group min/max honest)."""
    extra = -x.shape[0] % group
    return torch.cat((x, x[-1:].expand(extra, *x.shape[1:]))) if extra else x


def _key_range(k: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(token group, head, channel) min and max of k (M, H, D): each (ceil(M/group), H, D)."""
    m, h, d = k.shape
    kg = _edge_pad(k, group).view(-1, group, h, d)  # (num_groups, group, H, D)
    return kg.amin(dim=1), kg.amax(dim=1)


class Int4Codec:
    """Parts: window (2, W, H, D), k codes (M, H, D/2) u8, k scale/min (ceil(M/128), H, D) fp16,
    v codes (M, H, D/2) u8, v scale/min (M, H, D/g, 1) fp16 with g = min(64, D)."""

    name = "int4"

    def encode(self, slab: torch.Tensor) -> list[torch.Tensor]:
        window, middle = split_window(slab)
        k, v = middle[0].float(), middle[1].float()  # each (M, H, D)
        m, h, d = k.shape
        g = min(VALUE_GROUP, d)
        if m == 0:
            kq, ks, kz = quant.quant_asym(k, k, k, LEVELS)
            ks = kz = k.new_empty(0, h, d, dtype=torch.float16)
        else:
            lo, hi = _key_range(k, KEY_GROUP)
            kq, ks, kz = quant.quant_asym(k, quant.expand_groups(lo, KEY_GROUP, m),
                                          quant.expand_groups(hi, KEY_GROUP, m), LEVELS)
            ks, kz = ks[::KEY_GROUP].contiguous(), kz[::KEY_GROUP].contiguous()
        vg = v.reshape(m, h, d // g, g)  # (M, H, D/g, g)
        vq, vs, vz = quant.quant_asym(vg, vg.amin(-1, keepdim=True), vg.amax(-1, keepdim=True), LEVELS)
        return [window.to(window_dtype(slab.dtype)).contiguous(), quant.pack_nibbles(kq), ks, kz,
                quant.pack_nibbles(vq.reshape(m, h, d)), vs, vz]

    def decode(self, parts: Sequence[torch.Tensor], shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        _, t, h, d = shape
        window, kp, ks, kz, vp, vs, vz = _check(self.name, parts, 7)
        w = min(t, SINK + RECENT)
        m, g = t - w, min(VALUE_GROUP, d)
        nk = math.ceil(m / KEY_GROUP)
        _expect(self.name, parts, [(window_dtype(dtype), (2, w, h, d)), (torch.uint8, (m, h, d // 2)),
                                   (torch.float16, (nk, h, d)), (torch.float16, (nk, h, d)),
                                   (torch.uint8, (m, h, d // 2)), (torch.float16, (m, h, d // g, 1)),
                                   (torch.float16, (m, h, d // g, 1))])
        k = quant.dequant_asym(quant.unpack_nibbles(kp), quant.expand_groups(ks, KEY_GROUP, m),
                               quant.expand_groups(kz, KEY_GROUP, m))
        vq = quant.unpack_nibbles(vp).view(m, h, d // g, g)
        v = quant.dequant_asym(vq, vs, vz).reshape(m, h, d)
        return join_window(window.to(dtype), torch.stack((k, v)).to(dtype))  # (2, T, H, D)

    def wire_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        _, t, h, d = shape
        w = min(t, SINK + RECENT)
        m = t - w
        window = 2 * w * h * d * window_dtype(dtype).itemsize
        keys = m * h * d // 2 + math.ceil(m / KEY_GROUP) * h * d * 4
        values = m * h * d // 2 + m * h * (d // min(VALUE_GROUP, d)) * 4
        return window + keys + values


class Int4ZstdCodec:
    """Parts: format (4,) u8 = (ZSTD_FORMAT, levels, key delta, value delta), window (2, W, H, D),
    zstd(k symbols) u8, k scale/min (1, H, D) fp16, zstd(v symbols) u8, v scale/min (M, 1) fp16.

    Symbol streams are channel-major (one channel's tokens are neighbours, so zstd sees similar
    symbols together); keys are delta-coded mod `levels` along tokens first (values are not: their
    per-token grid moves from token to token); then two neighbouring codes share a byte
    (quant.pack_pairs). Every stage after quantization is lossless and undone exactly on decode.
    """

    name = "int4_zstd"

    def encode(self, slab: torch.Tensor) -> list[torch.Tensor]:
        window, middle = split_window(slab, recent=0)
        k, v = middle[0].float(), middle[1].float()  # each (M, H, D)
        m, h, d = k.shape
        if m == 0:
            lo = hi = k.new_zeros(1, h, d)
        else:
            lo, hi = k.amin(0, keepdim=True), k.amax(0, keepdim=True)  # (1, H, D)
        kq, ks, kz = quant.quant_asym(k, lo, hi, ZSTD_LEVELS)
        vf = v.reshape(m, h * d)  # (M, H*D): one group per token
        vq, vs, vz = quant.quant_asym(vf, vf.amin(-1, keepdim=True), vf.amax(-1, keepdim=True), ZSTD_LEVELS)
        kt, vt = kq.reshape(m, h * d).t(), vq.t()  # each (H*D, M): channel-major
        if KEY_DELTA:
            kt = quant.delta_mod(kt, ZSTD_LEVELS)
        if VALUE_DELTA:
            vt = quant.delta_mod(vt, ZSTD_LEVELS)
        zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        blob = lambda q: torch.from_numpy(  # noqa: E731 - zstd runs on the host: symbols cross once, packed
            np.frombuffer(zc.compress(quant.pack_pairs(q, ZSTD_LEVELS).cpu().numpy().tobytes()), np.uint8).copy())
        fmt = torch.tensor([ZSTD_FORMAT, ZSTD_LEVELS, KEY_DELTA, VALUE_DELTA], dtype=torch.uint8)
        return [fmt, window.to(window_dtype(slab.dtype)).contiguous(), blob(kt), ks, kz, blob(vt), vs, vz]

    def decode(self, parts: Sequence[torch.Tensor], shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        _, t, h, d = shape
        fmt, window, kb, ks, kz, vb, vs, vz = _check(self.name, parts, 8)
        w = min(t, SINK)
        m = t - w
        _expect(self.name, [fmt, window, ks, kz, vs, vz], [
            (torch.uint8, (4,)), (window_dtype(dtype), (2, w, h, d)), (torch.float16, (1, h, d)),
            (torch.float16, (1, h, d)), (torch.float16, (m, 1)), (torch.float16, (m, 1))])
        version, levels, key_delta, value_delta = fmt.tolist()
        if version != ZSTD_FORMAT or not 2 <= levels <= 16 or key_delta > 1 or value_delta > 1:
            raise ValueError(f"int4_zstd: unsupported format {fmt.tolist()} (this build writes "
                             f"{[ZSTD_FORMAT, ZSTD_LEVELS, KEY_DELTA, VALUE_DELTA]})")
        kt, vt = _codes(kb, levels, h * d, m).to(ks.device), _codes(vb, levels, h * d, m).to(vs.device)  # (H*D, M)
        if key_delta:
            kt = quant.undelta_mod(kt, levels)
        if value_delta:
            vt = quant.undelta_mod(vt, levels)
        k = quant.dequant_asym(kt.t().reshape(m, h, d), ks, kz)
        v = quant.dequant_asym(vt.t(), vs, vz).view(m, h, d)
        return torch.cat((window.to(dtype), torch.stack((k, v)).to(dtype)), dim=1)  # (2, T, H, D)

    def wire_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        return None


def _codes(blob: torch.Tensor, levels: int, c: int, m: int) -> torch.Tensor:
    """Channel-major codes (C, M) out of a zstd blob of pair symbols; anything malformed is a ValueError."""
    n = c * (m // 2) + c * (m % 2)
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError("int4_zstd: a code blob must be 1-D uint8")
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob.cpu().numpy().tobytes(), max_output_size=n)
    except zstandard.ZstdError as e:
        raise ValueError(f"int4_zstd: bad zstd stream: {e}") from None
    if len(raw) != n:
        raise ValueError(f"int4_zstd: {len(raw)} symbol bytes, expected {n}")
    try:
        return quant.unpack_pairs(torch.from_numpy(np.frombuffer(raw, np.uint8).copy()), levels, c, m)
    except ValueError as e:
        raise ValueError(f"int4_zstd: {e}") from None


def _check(name: str, parts: Sequence[torch.Tensor], n: int) -> Sequence[torch.Tensor]:
    if len(parts) != n:
        raise ValueError(f"{name}: expected {n} parts, got {len(parts)}")
    return parts


def _expect(name: str, parts: Sequence[torch.Tensor], spec: list[tuple[torch.dtype, tuple[int, ...]]]) -> None:
    if [(p.dtype, tuple(p.shape)) for p in parts] != spec:
        raise ValueError(f"{name}: parts do not match the slab shape")
