"""Latency sources: the published DistServe profile, the roofline, KV capacity, the model catalog."""

from __future__ import annotations

import csv
import json

import pytest

from pdserve.placement.hardware import load_gpu
from pdserve.placement.latency import Coeffs, Curve, PhaseProfile, kv_capacity_tokens
from pdserve.placement.model_spec import from_hf_config, load_model
from pdserve.placement.profile_file import load_profile
from pdserve.placement.roofline import Roofline
from pdserve.placement.transfer import TransferModel

REF = "/work/shared/reference/distserve/max_num_tokens.csv"


def test_published_profile_is_read_in_seconds():
    p = load_profile("distserve-a100").profile(load_model("opt-13b"), 1)
    assert p is not None
    assert p.prefill.a == pytest.approx(0.018102546, rel=1e-6)
    assert p.prefill_s(512, 512**2) == pytest.approx(0.0721, abs=1e-3)  # 72 ms (distserve-notes §3.2)
    assert p.decode_coeffs(96) is p.decode_large and p.decode_coeffs(95) is p.decode_small
    assert load_profile("distserve-a100").profile(load_model("opt-66b"), 1) is None  # no TP1 data


def test_catalog_parameter_counts():
    assert load_model("opt-13b").num_params / 1e9 == pytest.approx(12.85, abs=0.05)
    assert load_model("opt-66b").num_params / 1e9 == pytest.approx(65.7, abs=0.2)
    assert load_model("llama-3-8b").num_params / 1e9 == pytest.approx(8.03, abs=0.02)
    assert load_model("llama-3-70b").num_params / 1e9 == pytest.approx(70.55, abs=0.05)
    # OPT-66B: 512 tokens of KV ≈ 1.2 GB (DistServe §3.3 quotes 1.13 GiB)
    assert 512 * load_model("opt-66b").kv_bytes_per_token / 2**30 == pytest.approx(1.125, rel=0.01)


def test_hf_config_matches_catalog(tmp_path):
    cfg = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
           "tie_word_embeddings": False, "max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_model(str(tmp_path))
    assert spec.num_params == load_model("llama-3-8b").num_params
    assert from_hf_config(cfg).kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


@pytest.mark.skipif(not __import__("os").path.exists(REF), reason="reference data not present")
def test_kv_capacity_close_to_distserve_table():
    gpu = load_gpu("a100-80g")
    with open(REF) as f:
        rows = [r for r in csv.DictReader(f) if r["model"] in ("facebook/opt-13b", "facebook/opt-66b")]
    for r in rows:
        ours = kv_capacity_tokens(load_model(r["model"]), gpu, int(r["tp"]), int(r["pp"]))
        want = int(r["max_num_tokens"])
        assert abs(ours - want) <= max(0.1 * want, 3000), (r, ours)


def test_roofline_tracks_published_a100_fit():
    model, gpu = load_model("opt-13b"), load_gpu("a100-80g")
    pub, roof = load_profile("distserve-a100"), Roofline(gpu=gpu)
    for tp in (1, 2, 4):
        p, r = pub.profile(model, tp), roof.profile(model, tp)
        assert r.prefill_s(1024, 1024**2) == pytest.approx(p.prefill_s(1024, 1024**2), rel=0.3)
        assert r.decode_s(32 * 1000, 32) == pytest.approx(p.decode_s(32 * 1000, 32), rel=0.3)
    assert roof.profile(model, 3) is None  # 40 heads do not split 3 ways
    h100 = Roofline(gpu=load_gpu("h100")).profile(model, 1)
    assert h100.prefill_s(2048, 2048**2) < roof.profile(model, 1).prefill_s(2048, 2048**2)


def test_transfer_time_scales_with_codec():
    raw = TransferModel(kv_bytes_per_token=1e6, bytes_per_s=1e9, overhead_s=0.001)
    int8 = TransferModel(kv_bytes_per_token=1e6, bytes_per_s=1e9, codec="int8", overhead_s=0.001)
    assert raw.transfer_s(1000) == pytest.approx(1.001)
    assert int8.transfer_s(1000) < raw.transfer_s(1000) / 1.9
    with pytest.raises(ValueError, match="codec"):
        TransferModel(kv_bytes_per_token=1, bytes_per_s=1, codec="zip")


def test_curve_interpolates_and_extends():
    c = Curve((1, 2, 4), (0.05, 0.08, 0.09), 1e-5)
    assert c.base(0) == c.base(1) == 0.05  # flat before the first point
    assert c.base(3) == pytest.approx(0.085) and c(3, 1000) == pytest.approx(0.095)
    assert c.base(8) == pytest.approx(0.11)  # past the last point along the last slope
    assert Curve((1, 2), (0.08, 0.05), 0.0).base(5) == 0.05  # never continued downwards
    with pytest.raises(ValueError, match="increasing"):
        Curve((2, 1), (0.1, 0.2), 0.0)


def test_profile_uses_curves_where_measured():
    linear = PhaseProfile(prefill=Coeffs(0.01, 1e-3, 0.0), decode_small=Coeffs(0.05, 1e-5, 0.004),
                          decode_large=Coeffs(0.05, 1e-5, 0.004))
    p = PhaseProfile(prefill=linear.prefill, decode_small=linear.decode_small, decode_large=linear.decode_large,
                     prefill_tokens=Curve((32, 512), (0.04, 0.60), 1e-7), decode_batch=Curve((1, 2, 4), (0.05, 0.08, 0.09), 1e-5))
    assert p.decode_s(600, 2) == pytest.approx(0.08 + 600e-5)
    assert p.decode_s(600, 5) == linear.decode_s(600, 5)  # past the measured batches: the linear fit
    assert p.prefill_s(272, 272**2) == pytest.approx(0.32 + 1e-7 * 272**2)
    # a 32-token chunk riding on 4 decodes costs what the curve adds between 4 and 36 tokens
    assert p.prefill_extra_s(4, 32, 1000) == pytest.approx(p.prefill_tokens.base(36) - 0.04 + 1e-4)
    assert linear.prefill_extra_s(4, 32, 1000) == pytest.approx(32e-3)


def test_scaled_profile_makes_every_step_k_times_as_long():
    p = PhaseProfile(prefill=Coeffs(0.07, 2.6e-3, 5e-7), decode_small=Coeffs(0.05, 1e-5, 8e-3),
                     decode_large=Coeffs(0.04, 1e-5, 6e-3), large_batch_threshold=8,
                     prefill_tokens=Curve((16.0, 512.0), (0.1, 1.4), 4e-7), decode_batch=Curve((1.0, 4.0), (0.05, 0.08), 1e-5))
    q = p.scaled(1.1)
    for sum_len, sq in ((100, 10_000), (700, 300_000)):
        assert q.prefill_s(sum_len, sq) == pytest.approx(1.1 * p.prefill_s(sum_len, sq))
    for ctx, b in ((300, 1), (900, 3), (4000, 20)):  # on the curve, and past it on the large-batch form
        assert q.decode_s(ctx, b) == pytest.approx(1.1 * p.decode_s(ctx, b))
    assert q.prefill_extra_s(4, 28, 5000) == pytest.approx(1.1 * p.prefill_extra_s(4, 28, 5000))
