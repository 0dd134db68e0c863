"""Quantization kernels shared by the lossy codecs: pure tensor functions, fp32 math on the input's
device (CPU or GPU); every tensor they create is created there.

Scales and zero points travel as fp16, so every kernel quantizes with the fp16-rounded scale it
ships: the receiver reconstructs exactly what the sender measured its error against.
"""

from __future__ import annotations

import torch

_FP16_MAX = 65504.0
_TINY = 1e-8


def _scale16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, _FP16_MAX).to(torch.float16)


def pad_tokens(x: torch.Tensor, group: int) -> torch.Tensor:
    """Zero-pad dim 0 (tokens) to a multiple of `group`."""
    extra = -x.shape[0] % group
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, extra)) if extra else x


def absmax_per_channel(x: torch.Tensor, group: int, qmax: float) -> torch.Tensor:
    """fp16 scales for symmetric quantization of x (T, H, D), one per (group of `group` tokens, head,
    channel): (ceil(T / group), H, D)."""
    t, h, d = x.shape
    xg = pad_tokens(x, group).view(-1, group, h, d)  # (num_groups, group, H, D)
    return _scale16(xg.abs().amax(dim=1) / qmax)


def expand_groups(s: torch.Tensor, group: int, t: int) -> torch.Tensor:
    """(num_groups, H, D) per-group values -> (t, H, D), each repeated over its tokens."""
    return s.float().repeat_interleave(group, dim=0)[:t]


def absmax_per_token(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """fp16 scales, one per (token, head): (T, H, 1)."""
    return _scale16(x.abs().amax(dim=-1, keepdim=True) / qmax)


def quant_sym(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """int8 codes of x / scale, rounded and clamped to [-qmax, qmax]."""
    return torch.round(x / scale.clamp_min(_TINY)).clamp_(-qmax, qmax).to(torch.int8)


def quant_asym(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric codes in [0, levels-1] over [lo, hi] (broadcast to x): (codes uint8, scale16, min16)."""
    scale16, min16 = _scale16((hi - lo) / (levels - 1)), lo.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
    q = torch.round((x - min16.float()) / scale16.float().clamp_min(_TINY)).clamp_(0, levels - 1)
    return q.to(torch.uint8), scale16, min16


def dequant_asym(q: torch.Tensor, scale16: torch.Tensor, min16: torch.Tensor) -> torch.Tensor:
    return q.float() * scale16.float() + min16.float()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] with an even last dim -> uint8 with half the last dim (low nibble first)."""
    assert q.shape[-1] % 2 == 0, "int4 packing needs an even last dimension"
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    out = torch.stack((p & 0xF, p >> 4), dim=-1)  # (..., D/2, 2)
    return out.flatten(-2)


def delta_mod(q: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes (C, M) in [0, levels) -> first code, then (q[t] - q[t-1]) mod levels along dim -1: still
    in [0, levels), and neighbouring tokens that agree become 0 (CacheGen's token-wise locality)."""
    d = q.to(torch.int16)
    d[:, 1:] = torch.remainder(d[:, 1:] - q[:, :-1].to(torch.int16), levels)
    return d.to(torch.uint8)


def undelta_mod(d: torch.Tensor, levels: int) -> torch.Tensor:
    """Inverse of delta_mod, exactly."""
    return torch.remainder(d.to(torch.int32).cumsum(dim=-1), levels).to(torch.uint8)


def pack_pairs(q: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes (C, M) in [0, levels) with levels <= 16 -> 1-D uint8 symbols: q[:, 2i] * levels + q[:, 2i+1]
    row by row ((C, M // 2) symbols), then the last column alone when M is odd. One byte then holds two
    neighbouring tokens of one channel, so an order-0 entropy coder (zstd's Huffman) codes their
    joint distribution."""
    m = q.shape[1]
    even = m // 2 * 2
    q16 = q.to(torch.int16)
    pairs = (q16[:, 0:even:2] * levels + q16[:, 1:even:2]).to(torch.uint8)  # (C, M // 2)
    return torch.cat((pairs.reshape(-1), q[:, even:].reshape(-1).to(torch.uint8)))


def unpack_pairs(s: torch.Tensor, levels: int, c: int, m: int) -> torch.Tensor:
    """Inverse of pack_pairs -> (C, M) uint8; ValueError if a symbol is out of range."""
    half = m // 2
    if s.numel() != c * half + c * (m % 2):
        raise ValueError(f"{s.numel()} symbols, expected {c * half + c * (m % 2)}")
    pairs, tail = s[:c * half].view(c, half), s[c * half:].view(c, m % 2)
    if (pairs.numel() and int(pairs.max()) >= levels * levels) or (tail.numel() and int(tail.max()) >= levels):
        raise ValueError("symbol out of range")
    byte = torch.arange(256, device=s.device)
    lut = torch.stack((byte // levels, byte % levels), dim=-1).to(torch.uint8)  # (256, 2): symbol -> pair
    out = lut.index_select(0, pairs.reshape(-1).int()).view(c, 2 * half)  # (C, M - M % 2)
    return torch.cat((out, tail), dim=1)
