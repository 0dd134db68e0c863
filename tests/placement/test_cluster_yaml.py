"""cluster.yaml must pass Ray's own cluster-launcher validation and carry the pool node types."""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_passes_ray_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    prepared = prepare_config(raw)
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert {"head", "prefill_gpu", "decode_gpu"} <= set(types)
    assert types["prefill_gpu"]["resources"]["prefill_gpu_node"] > 0
    assert types["decode_gpu"]["resources"]["decode_gpu_node"] > 0
    assert prepared["head_node_type"] == "head"


def test_ray_validation_rejects_unknown_top_level_keys() -> None:
    """Why serving settings live in their own YAML: Ray refuses them in cluster.yaml."""
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    raw["pdserve"] = {"mode": "disaggregated"}
    with pytest.raises(Exception, match="pdserve"):
        validate_config(prepare_config(raw))
