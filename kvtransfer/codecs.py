"""Codec registry by name (the names of `pdserve.config.CodecName`), and the quality ladder.

`LADDER` orders the codecs from lossless to most compressed; the controller walks it. `auto` is
not a codec: the receiver resolves it per transfer with `CodecController`.
"""

from __future__ import annotations

from typing import Callable

from pdserve.kvtransfer.codec_int4 import Int4Codec, Int4ZstdCodec
from pdserve.kvtransfer.codec_raw import RawCodec
from pdserve.kvtransfer.codec_scaled import fp8_codec, int8_codec
from pdserve.kvtransfer.protocols import KVCodec

_FACTORIES: dict[str, Callable[[], KVCodec]] = {
    "raw": RawCodec, "int8": int8_codec, "fp8": fp8_codec, "int4": Int4Codec, "int4_zstd": Int4ZstdCodec,
}
LADDER: tuple[str, ...] = ("raw", "int8", "int4", "int4_zstd")  # fp8 only on request: int8 is as small and more accurate
CODEC_NAMES: tuple[str, ...] = tuple(_FACTORIES)
_CACHE: dict[str, KVCodec] = {}


def get_codec(name: str) -> KVCodec:
    """The codec called `name`; codecs are stateless, so one instance per name is shared."""
    if name not in _FACTORIES:
        raise ValueError(f"codec: unknown codec {name!r} (known: {', '.join(CODEC_NAMES)})")
    if name not in _CACHE:
        _CACHE[name] = _FACTORIES[name]()
    return _CACHE[name]
