"""Serving config: YAML round trip, unknown keys and bad values rejected with their dotted path."""

from __future__ import annotations

import pytest

from pdserve.config import ConfigError, ServingConfig


def test_defaults_round_trip_through_yaml(tmp_path) -> None:
    cfg = ServingConfig()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert ServingConfig.load(path) == cfg


@pytest.mark.parametrize("data,field", [
    ({"decode": {"tp": "two"}}, "decode.tp"),
    ({"decode": {"instances": 0}}, "decode.instances"),
    ({"prefill": {"bogus": 1}}, "prefill.bogus"),
    ({"mode": "mixed"}, "mode"),
    ({"kvtransfer": {"codec": "gzip"}}, "kvtransfer.codec"),
    ({"router": {"port": 70000}}, "router.port"),
    ({"slo": {"attainment": 1.5}}, "slo.attainment"),
    ({"engine": {"block_size": -1}}, "engine.block_size"),
    ({"prefill": {"resources": {"gpu_node": "x"}}}, "prefill.resources.gpu_node"),
    ({"router": []}, "router"),
    ({"router": {"pd_threshold_tokens": -1}}, "router.pd_threshold_tokens"),
    ({"router": {"pd_prefill_queue_limit": -5}}, "router.pd_prefill_queue_limit"),
    ({"mode": "colocated", "router": {"pd_threshold_tokens": 64}}, "router.pd_threshold_tokens"),
])
def test_bad_values_name_their_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        ServingConfig.from_dict(data)
    assert str(e.value).startswith(field), str(e.value)


def test_types_are_coerced_only_where_safe() -> None:
    cfg = ServingConfig.from_dict({"engine": {"kv_cache_memory_gb": 2}, "router": {"api_key": None}})
    assert cfg.engine.kv_cache_memory_gb == 2.0
    with pytest.raises(ConfigError, match="decode.tp"):
        ServingConfig.from_dict({"decode": {"tp": True}})
