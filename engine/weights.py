"""Reads a Hugging Face checkpoint directory (one or many .safetensors files) into a model stage.

The model is built on the `meta` device (no memory) and already TP-sharded (engine/tp.py on meta
only changes shapes), so its state dict says exactly which slice of which checkpoint tensor this
rank owns. Each slice is read from the file with plain `pread`s (no mmap, so only the bytes read
are ever touched), cast to the target dtype, placed on the target device and assigned. Peak memory
per rank is its shard plus one slice in flight on the host — never the whole stage or checkpoint.

A .safetensors file is `u64 n | n bytes of JSON header | data`; the header maps each tensor name to
its dtype, shape and [begin, end) byte offsets in the data, row-major.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from pdserve.engine.model import LlamaForCausalLM

_TIED = ("lm_head.weight", "model.embed_tokens.weight")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}
_BLOCK_BYTES = 16 << 20  # staging for a strided (column) slice: this many bytes of whole rows at a time


class SafetensorsFile:
    """One .safetensors file's header; `read` returns a slice of one tensor along one dimension."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.path, self.data_start, self.entries = path, 8 + n, header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of tensor `name` along `dim`, in the checkpoint's dtype (a new CPU tensor)."""
        e = self.entries[name]
        dtype, shape = _DTYPES[e["dtype"]], tuple(e["shape"]) or (1,)  # a scalar reads as (1,)
        stop = shape[dim] if stop is None else stop
        outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:]) * dtype.itemsize  # inner: bytes
        row, part = shape[dim] * inner, (stop - start) * inner  # bytes per outer row: whole, this slice
        out = torch.empty(outer * part, dtype=torch.uint8)  # (outer, part) bytes
        base = self.data_start + e["data_offsets"][0]
        with open(self.path, "rb", buffering=0) as f:
            fd = f.fileno()
            if outer == 1 or part == row:  # one contiguous range
                _pread(fd, out, base + (start * inner if outer == 1 else 0))
            else:  # whole rows through a bounded staging buffer, keep each row's [start, stop)
                rows = min(outer, max(1, _BLOCK_BYTES // row))
                stage = torch.empty(rows * row, dtype=torch.uint8)
                for r0 in range(0, outer, rows):
                    n = min(rows, outer - r0)
                    _pread(fd, stage[:n * row], base + r0 * row)
                    out[r0 * part:(r0 + n) * part].view(n, part).copy_(
                        stage[:n * row].view(n, row)[:, start * inner:start * inner + part])
        return out.view(dtype).reshape(shape[:dim] + (stop - start,) + shape[dim + 1:])


def _pread(fd: int, buf: torch.Tensor, offset: int) -> None:
    view, done = memoryview(buf.numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ValueError(f"model: checkpoint file ends early (offset {offset + done})")
        done += n


def load_checkpoint(model: LlamaForCausalLM, path: Path, dtype: torch.dtype, device: torch.device,
                    tp_rank: int = 0, tp_size: int = 1) -> None:
    """Fill `model`'s parameters (meta or real) with this rank's slices of the checkpoint at `path`."""
    files = [SafetensorsFile(f) for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise ValueError(f"model: no .safetensors files in {path}")
    where = {name: f for f in files for name in f.entries}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source = {k: k for k in own}
    if _TIED[0] in own and _TIED[0] not in where:
        source[_TIED[0]] = _TIED[1]  # tied embeddings fill lm_head
    missing = [k for k, src in source.items() if src not in where]
    if missing:
        raise ValueError(f"model: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    read: dict[str, torch.Tensor] = {}
    for k, src in source.items():
        if src not in read:
            dim, start, stop = shard_of(where[src].shape(src), own[k], tp_rank, tp_size, src)
            read[src] = where[src].read(src, dim, start, stop).to(device, dtype)
    model.load_hf_state_dict({k: read[src] for k, src in source.items()}, assign=True)


def shard_of(full: tuple[int, ...], shape: tuple[int, ...], rank: int, size: int, name: str) -> tuple[int, int, int]:
    """(dim, start, stop) of this rank's slice of a checkpoint tensor whose shard has `shape`
    (tp.py's split: rank r of `size` holds [r * n, (r + 1) * n) along the one dimension it splits)."""
    differ = [d for d, (f, n) in enumerate(zip(full, shape)) if f != n]
    if len(full) != len(shape) or len(differ) > 1 or (differ and full[differ[0]] != shape[differ[0]] * size):
        raise ValueError(f"model: {name} is {list(full)} in the checkpoint, {list(shape)} in this rank's "
                         f"shard (tp {size}); the checkpoint does not match its config.json")
    if not differ:
        return 0, 0, full[0] if full else 1  # the whole tensor
    d, n = differ[0], shape[differ[0]]
    return d, rank * n, (rank + 1) * n
