"""`raw` codec: the cache dtype's bytes, unchanged. Bit-exact; the slab itself is the only part."""

from __future__ import annotations

import math
from typing import Sequence

import torch


class RawCodec:
    name = "raw"

    def encode(self, slab: torch.Tensor) -> list[torch.Tensor]:
        return [slab.contiguous()]  # zero-copy when the slab already is (a whole-head gather)

    def decode(self, parts: Sequence[torch.Tensor], shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if len(parts) != 1 or parts[0].dtype != dtype or tuple(parts[0].shape) != tuple(shape):
            raise ValueError(f"raw: expected one {dtype}{list(shape)} part")
        return parts[0]

    def wire_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        return math.prod(shape) * dtype.itemsize
