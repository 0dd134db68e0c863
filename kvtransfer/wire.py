"""Wire format: one frame per (layer, shard) slab = a header chunk, then body chunks.

Every chunk is `prefix | data` with prefix = (magic u32, seq u32, crc32 u32, length u32), little
endian, and at most `MAX_CHUNK` bytes in all (the 4 MiB gRPC message default). Chunk 0 carries the
protobuf `FrameHeader` (versioned: codec, dtype, slab shape, layer, first head, part specs), the next
chunks carry the codec's parts in order, never spanning two parts. `FrameReader` checks magic,
sequence, length and crc of every chunk and the header's sizes before decoding anything; a mismatch
raises `WireError`, which the receiver turns into FAILED. Nothing received is ever unpickled.

The protobuf stubs are generated and committed; regenerate after editing kvtransfer.proto with
    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. kvtransfer/kvtransfer.proto
    sed -i 's/^from kvtransfer import/from pdserve.kvtransfer import/' kvtransfer/kvtransfer_pb2_grpc.py
(grpcio-tools 1.85 emits code that needs protobuf >= 7.35.1 and grpcio >= 1.85.1 at run time).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from pdserve.kvtransfer import kvtransfer_pb2 as pb

VERSION = 2  # 2: int4_zstd carries its entropy-stage format part
MAGIC = 0x3156_4B50  # b"PKV1" little endian
MAX_CHUNK = 4 << 20
_PREFIX = struct.Struct("<IIII")
MAX_DATA = MAX_CHUNK - _PREFIX.size
_MAX_HEADER = 64 << 10
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.float8_e4m3fn)}


class WireError(ValueError):
    """A received chunk or frame is malformed or corrupted."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise WireError(f"unknown dtype {name!r}")
    return _DTYPES[name]


@dataclass(frozen=True)
class Frame:
    """A verified, decoded frame: the header's fields and the codec parts (fresh CPU tensors)."""

    codec: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # (2, num_tokens, num_heads, head_dim)
    layer: int
    head_start: int
    parts: list[torch.Tensor]


def _chunk(seq: int, data: memoryview | bytes) -> bytes:
    assert len(data) <= MAX_DATA, "chunk too large"
    return b"".join((_PREFIX.pack(MAGIC, seq, zlib.crc32(data), len(data)), data))


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def _header(codec: str, dtype: torch.dtype, shape: Sequence[int], layer: int, head_start: int,
            parts: Sequence[torch.Tensor], nbytes: Sequence[int]) -> pb.FrameHeader:
    specs = [pb.TensorSpec(dtype=dtype_name(p.dtype), shape=list(p.shape), nbytes=n) for p, n in zip(parts, nbytes)]
    return pb.FrameHeader(version=VERSION, codec=codec, dtype=dtype_name(dtype), shape=list(shape), layer=layer,
                          head_start=head_start, parts=specs, body_nbytes=sum(nbytes),
                          num_chunks=sum(math.ceil(n / MAX_DATA) for n in nbytes))


def encode_frame(codec: str, dtype: torch.dtype, shape: Sequence[int], layer: int, head_start: int,
                 parts: Sequence[torch.Tensor]) -> Iterator[bytes]:
    """Chunks of one frame, produced lazily (a 64 MiB slab never sits on the wire twice)."""
    views = [_as_bytes(p) for p in parts]
    header = _header(codec, dtype, shape, layer, head_start, parts, [len(v) for v in views])
    yield _chunk(0, header.SerializeToString())
    seq = 1
    for v in views:
        for off in range(0, len(v), MAX_DATA):
            yield _chunk(seq, v[off:off + MAX_DATA])
            seq += 1


@dataclass(frozen=True)
class TensorFrame:
    """A frame for a transport's tensor lane: the serialized `FrameHeader` (as in chunk 0 of the byte
    wire) and the codec's parts as tensors, which travel as they are (no host copy, no crc: the lane,
    gloo or NCCL over TCP/NVLink/IB, or CUDA IPC, delivers them intact or fails)."""

    header: bytes
    parts: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(p.numel() * p.element_size() for p in self.parts)


def tensor_frame(codec: str, dtype: torch.dtype, shape: Sequence[int], layer: int, head_start: int,
                 parts: Sequence[torch.Tensor]) -> TensorFrame:
    """The frame of `encode_frame` for a tensor lane; parts are made contiguous (on their device)."""
    parts = [p.contiguous() for p in parts]
    nbytes = [p.numel() * p.element_size() for p in parts]
    return TensorFrame(_header(codec, dtype, shape, layer, head_start, parts, nbytes).SerializeToString(), parts)


def lane_buffers(header: bytes, device: torch.device) -> tuple[pb.FrameHeader, list[torch.Tensor]]:
    """The checked header of a tensor-lane frame and empty tensors on `device` for its parts."""
    h, _ = parse_header(header)
    return h, [torch.empty(tuple(p.shape), dtype=parse_dtype(p.dtype), device=device) for p in h.parts]


def lane_frame(h: pb.FrameHeader, parts: list[torch.Tensor]) -> Frame:
    """The `Frame` a tensor lane received (parts filled by the lane, on the receiver's device)."""
    return Frame(h.codec, parse_dtype(h.dtype), tuple(h.shape), h.layer, h.head_start, parts)


def parse_header(data: memoryview | bytes) -> tuple[pb.FrameHeader, list[int]]:
    """A frame header, checked (version, dtype, slab shape, part sizes); returns it and each part's
    byte size. Raises WireError."""
    if len(data) > _MAX_HEADER:
        raise WireError("frame header too large")
    h = pb.FrameHeader()
    try:
        h.ParseFromString(bytes(data))
    except Exception as e:  # protobuf raises its own DecodeError
        raise WireError(f"bad frame header: {e}") from None
    if h.version != VERSION:
        raise WireError(f"frame version {h.version}, this build reads {VERSION}")
    parse_dtype(h.dtype)
    if len(h.shape) != 4 or h.shape[0] != 2 or min(h.shape) < 0:
        raise WireError(f"bad slab shape {list(h.shape)}")
    sizes = []
    for p in h.parts:
        n = math.prod(p.shape) * parse_dtype(p.dtype).itemsize
        if n != p.nbytes or min(p.shape, default=0) < 0:
            raise WireError(f"part {p.dtype}{list(p.shape)} says {p.nbytes} bytes, expected {n}")
        sizes.append(n)
    if sum(sizes) != h.body_nbytes or sum(math.ceil(n / MAX_DATA) for n in sizes) != h.num_chunks:
        raise WireError("frame header sizes are inconsistent")
    return h, sizes


def frame_nbytes(part_nbytes: Sequence[int], header_nbytes: int = 0) -> int:
    """Bytes on the wire for a frame whose parts have these sizes (prefixes included)."""
    body = sum(n + math.ceil(n / MAX_DATA) * _PREFIX.size for n in part_nbytes)
    return body + header_nbytes + _PREFIX.size


class FrameReader:
    """Reassembles frames from a chunk stream; `feed` returns a Frame when one completes."""

    def __init__(self) -> None:
        self._header: pb.FrameHeader | None = None
        self._parts: list[np.ndarray] = []
        self._seq = 0
        self._part = 0
        self._off = 0

    @property
    def idle(self) -> bool:
        """True between frames (a stream that ends while not idle was cut short)."""
        return self._header is None

    def feed(self, chunk: memoryview | bytes) -> Frame | None:
        data = self._check_chunk(memoryview(chunk))
        if self._header is None:
            self._start(data)
        else:
            self._append(data)
        self._seq += 1
        return self._maybe_finish()

    def _check_chunk(self, chunk: memoryview) -> memoryview:
        if len(chunk) < _PREFIX.size:
            raise WireError(f"chunk of {len(chunk)} bytes is shorter than its prefix")
        magic, seq, crc, length = _PREFIX.unpack_from(chunk)
        data = chunk[_PREFIX.size:]
        if magic != MAGIC:
            raise WireError(f"bad magic {magic:#x}")
        if seq != self._seq:
            raise WireError(f"chunk {seq} arrived, expected {self._seq}")
        if length != len(data):
            raise WireError(f"chunk {seq}: length {len(data)}, prefix says {length}")
        if zlib.crc32(data) != crc:
            raise WireError(f"chunk {seq}: checksum mismatch")
        return data

    def _start(self, data: memoryview) -> None:
        h, sizes = parse_header(data)
        self._header, self._parts = h, [np.empty(n, np.uint8) for n in sizes]
        self._part, self._off = 0, 0
        self._skip_empty_parts()

    def _append(self, data: memoryview) -> None:
        if self._part >= len(self._parts):
            raise WireError("more chunks than the header announced")
        buf = self._parts[self._part]
        if self._off + len(data) > len(buf) or (len(data) < MAX_DATA and self._off + len(data) != len(buf)):
            raise WireError(f"chunk {self._seq} does not fit part {self._part}")
        buf[self._off:self._off + len(data)] = np.frombuffer(data, np.uint8)
        self._off += len(data)
        if self._off == len(buf):
            self._part, self._off = self._part + 1, 0
            self._skip_empty_parts()

    def _skip_empty_parts(self) -> None:
        while self._part < len(self._parts) and len(self._parts[self._part]) == 0:
            self._part += 1

    def _maybe_finish(self) -> Frame | None:
        h = self._header
        if h is None or self._part < len(self._parts):
            return None
        parts = [_tensor(buf, parse_dtype(p.dtype), tuple(p.shape)) for buf, p in zip(self._parts, h.parts)]
        frame = lane_frame(h, parts)
        self._header, self._parts, self._seq = None, [], 0
        return frame


def _tensor(buf: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if buf.size == 0:  # torch cannot reinterpret an empty byte tensor
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(buf).view(dtype).reshape(shape)
