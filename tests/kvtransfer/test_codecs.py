"""Every codec: shape/dtype round trip, exact wire size, corruption detected, error bounds."""

from __future__ import annotations

import pytest
import torch
import zstandard

from pdserve.kvtransfer import codec_int4, quant, wire
from pdserve.kvtransfer.codec_int4 import RECENT, SINK, ZSTD_LEVELS
from pdserve.kvtransfer.codecs import CODEC_NAMES, get_codec

# relative Frobenius error bound on Gaussian KV (head_dim 64)
BOUNDS = {"raw": 0.0, "int8": 0.01, "fp8": 0.04, "int4": 0.12, "int4_zstd": 0.13}


def _slab(t: int, dtype: torch.dtype = torch.float32, h: int = 3, d: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(t)
    return torch.randn(2, t, h, d, generator=g).to(dtype)


def _through_wire(name: str, slab: torch.Tensor) -> tuple[wire.Frame, list[bytes]]:
    chunks = list(wire.encode_frame(name, slab.dtype, slab.shape, 5, 2, get_codec(name).encode(slab)))
    reader, frames = wire.FrameReader(), []
    for c in chunks:
        if (f := reader.feed(c)) is not None:
            frames.append(f)
    assert len(frames) == 1 and reader.idle
    return frames[0], chunks


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("t", [0, 1, SINK + RECENT, SINK + RECENT + 1, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_shape_dtype_and_wire_size(name: str, t: int, dtype: torch.dtype) -> None:
    codec, slab = get_codec(name), _slab(t, dtype)
    frame, _ = _through_wire(name, slab)
    assert (frame.codec, frame.layer, frame.head_start, frame.shape) == (name, 5, 2, tuple(slab.shape))
    out = codec.decode(frame.parts, frame.shape, frame.dtype)
    assert out.shape == slab.shape and out.dtype == dtype
    n = codec.wire_nbytes(slab.shape, dtype)
    if n is not None:
        assert n == sum(p.numel() * p.element_size() for p in codec.encode(slab))
    err = (out.float() - slab.float()).norm() / slab.float().norm().clamp_min(1e-12)
    assert err <= BOUNDS[name] + (0.01 if dtype == torch.bfloat16 and name != "raw" else 0.0)
    if name == "raw":
        assert torch.equal(out, slab)


def test_wire_size_formulas() -> None:
    t, h, d = 1000, 3, 64
    shape, f32 = (2, t, h, d), torch.float32
    assert get_codec("raw").wire_nbytes(shape, f32) == 2 * t * h * d * 4
    assert get_codec("int8").wire_nbytes(shape, f32) == 2 * t * h * d + 8 * h * d * 2 + t * h * 2
    m = t - SINK - RECENT
    assert get_codec("int4").wire_nbytes(shape, f32) == (2 * (SINK + RECENT) * h * d * 2 + m * h * d
                                                         + 8 * h * d * 4 + m * h * 4)
    assert get_codec("int4_zstd").wire_nbytes(shape, f32) is None


def test_int4_keeps_sink_and_recent_tokens_at_16_bit() -> None:
    slab = _slab(200)
    out = get_codec("int4").decode(get_codec("int4").encode(slab), slab.shape, slab.dtype)
    exact = torch.cat((slab[:, :SINK], slab[:, -RECENT:]), dim=1)
    got = torch.cat((out[:, :SINK], out[:, -RECENT:]), dim=1)
    assert torch.allclose(got, exact.half().float(), atol=0)


def test_int8_tracks_key_outlier_channels() -> None:
    slab = _slab(256)
    slab[0, :, :, 7] *= 50  # one outlier key channel, as real models have
    out = get_codec("int8").decode(get_codec("int8").encode(slab), slab.shape, slab.dtype)
    other = [c for c in range(64) if c != 7]
    err = (out[0][..., other] - slab[0][..., other]).norm() / slab[0][..., other].norm()
    assert err < 0.01  # per-channel key scales: the outlier does not swamp the other channels


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("which", ["header", "body"])
def test_corrupted_chunk_is_detected(name: str, which: str) -> None:
    _, chunks = _through_wire(name, _slab(300))
    i = 0 if which == "header" else len(chunks) - 1
    bad = bytearray(chunks[i])
    bad[len(bad) // 2 + 8] ^= 0x10
    reader = wire.FrameReader()
    with pytest.raises(wire.WireError):
        for j, c in enumerate(chunks):
            reader.feed(bytes(bad) if j == i else c)


def test_reordered_truncated_and_versioned_frames_are_rejected() -> None:
    _, chunks = _through_wire("raw", _slab(20000))
    assert len(chunks) == 1 + 8  # 2*20000*3*64*4 B = 30.7 MB -> a header chunk + 8 body chunks
    assert all(len(c) <= wire.MAX_CHUNK for c in chunks)
    with pytest.raises(wire.WireError, match="expected 1"):
        r = wire.FrameReader()
        r.feed(chunks[0])
        r.feed(chunks[2])
    with pytest.raises(wire.WireError, match="length"):
        wire.FrameReader().feed(chunks[0][:-1])
    from pdserve.kvtransfer import kvtransfer_pb2 as pb
    header = pb.FrameHeader(version=wire.VERSION + 1, dtype="float32", shape=[2, 0, 1, 1])
    with pytest.raises(wire.WireError, match="version"):
        wire.FrameReader().feed(wire._chunk(0, header.SerializeToString()))


def test_unknown_codec_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("int3")


@pytest.mark.parametrize("levels", [2, 12, 15, 16])
@pytest.mark.parametrize("m", [0, 1, 2, 7, 300])
def test_entropy_stage_transforms_are_exact(levels: int, m: int) -> None:
    g = torch.Generator().manual_seed(levels * 1000 + m)
    q = torch.randint(0, levels, (5, m), generator=g, dtype=torch.uint8)  # (C, M)
    d = quant.delta_mod(q, levels)
    assert d.dtype == torch.uint8 and (d.numel() == 0 or int(d.max()) < levels)
    assert torch.equal(quant.undelta_mod(d, levels), q)
    s = quant.pack_pairs(q, levels)
    assert s.dim() == 1 and s.numel() == 5 * (m // 2) + 5 * (m % 2)
    assert torch.equal(quant.unpack_pairs(s, levels, 5, m), q)


def test_int4_zstd_reconstructs_exactly_its_quantized_codes() -> None:
    """The entropy stage is lossless: decode gives exactly the dequantized 15-level grid."""
    slab = _slab(301)
    out = get_codec("int4_zstd").decode(get_codec("int4_zstd").encode(slab), slab.shape, slab.dtype)
    k, v = slab[0, SINK:], slab[1, SINK:]  # (M, H, D)
    m = k.shape[0]
    kq, ks, kz = quant.quant_asym(k, k.amin(0, keepdim=True), k.amax(0, keepdim=True), ZSTD_LEVELS)
    vf = v.reshape(m, -1)
    vq, vs, vz = quant.quant_asym(vf, vf.amin(-1, keepdim=True), vf.amax(-1, keepdim=True), ZSTD_LEVELS)
    assert torch.equal(out[0, SINK:], quant.dequant_asym(kq, ks, kz))
    assert torch.equal(out[1, SINK:], quant.dequant_asym(vq, vs, vz).view_as(v))
    assert torch.equal(out[:, :SINK], slab[:, :SINK].half().float())


def test_int4_zstd_delta_coding_shrinks_token_correlated_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    slab = (torch.randn(2, 1024, 3, 64, generator=g) * 0.05).cumsum(dim=1)  # KV that drifts along tokens
    codec = get_codec("int4_zstd")
    with_delta = codec.encode(slab)[2].numel()
    monkeypatch.setattr(codec_int4, "KEY_DELTA", 0)
    without = codec.encode(slab)
    assert with_delta < 0.9 * without[2].numel()
    out = codec.decode(without, slab.shape, slab.dtype)  # the format byte tells decode what was done
    assert (out - slab).norm() / slab.norm() < BOUNDS["int4_zstd"]


def test_int4_zstd_rejects_bad_format_and_symbols() -> None:
    slab, codec = _slab(100), get_codec("int4_zstd")
    parts = codec.encode(slab)
    for bad_fmt in ([9, 15, 1, 0], [codec_int4.ZSTD_FORMAT, 17, 1, 0], [codec_int4.ZSTD_FORMAT, 15, 2, 0]):
        with pytest.raises(ValueError, match="format"):
            codec.decode([torch.tensor(bad_fmt, dtype=torch.uint8), *parts[1:]], slab.shape, slab.dtype)
    m = 100 - SINK
    symbols = torch.full((3 * 64 * (m // 2),), 255, dtype=torch.uint8).numpy().tobytes()  # 255 >= 15 * 15
    blob = torch.frombuffer(bytearray(zstandard.ZstdCompressor().compress(symbols)), dtype=torch.uint8)
    with pytest.raises(ValueError, match="out of range"):
        codec.decode([*parts[:2], blob, *parts[3:]], slab.shape, slab.dtype)
    short = torch.frombuffer(bytearray(zstandard.ZstdCompressor().compress(symbols[:-1])), dtype=torch.uint8)
    with pytest.raises(ValueError, match="symbol bytes"):
        codec.decode([*parts[:2], short, *parts[3:]], slab.shape, slab.dtype)
