"""Every codec on CUDA slabs: quantise on the device, through the byte wire, dequantise on the
device, bounded like on CPU (review #4, #5: int4_zstd's `.numpy()` on CUDA codes, short slabs)."""

from __future__ import annotations

import pytest
import torch

from pdserve.kvtransfer import wire
from pdserve.kvtransfer.codec_int4 import RECENT, SINK
from pdserve.kvtransfer.codecs import CODEC_NAMES, get_codec
from tests.kvtransfer.test_codecs import BOUNDS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("t", [0, 3, SINK + 1, SINK + RECENT + 1, 300])
def test_cuda_slab_round_trips_through_the_wire_and_decodes_on_the_device(name: str, t: int) -> None:
    g = torch.Generator().manual_seed(t)
    slab = torch.randn(2, t, 2, 64, generator=g).to("cuda", torch.bfloat16)
    codec = get_codec(name)
    parts = codec.encode(slab)
    host = {"int4_zstd": {0, 2, 5}}.get(name, set())  # format byte and zstd blobs: made on the host
    assert [p.device.type for p in parts] == ["cpu" if i in host else "cuda" for i in range(len(parts))]
    reader, frame = wire.FrameReader(), None
    for chunk in wire.encode_frame(name, slab.dtype, slab.shape, 0, 0, parts):
        frame = reader.feed(chunk) or frame
    assert frame is not None
    out = codec.decode([p.to("cuda") for p in frame.parts], frame.shape, frame.dtype)
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16 and out.shape == slab.shape
    err = (out.float() - slab.float()).norm() / slab.float().norm().clamp_min(1e-12)
    assert err <= BOUNDS[name] + (0.01 if name != "raw" else 0.0)
    if name == "raw":
        assert torch.equal(out, slab)
