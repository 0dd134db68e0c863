"""Algorithm 2's placement reaches the deployment: plan → serving YAML → load → launch's placement
groups put every rank where the plan's node groups say (no Ray needed), and the config rejects
pairings the pools cannot split into."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from pdserve.cli import main
from pdserve.config import ConfigError, PoolConfig, ServingConfig
from pdserve.placement.groups import group_specs
from pdserve.placement.plan import Plan


def _plan(tmp_path: Path, *extra: str) -> tuple[ServingConfig, Plan]:
    out = tmp_path / "serving.yaml"
    main(["plan", "--model", "llama-3-8b", "--gpu", "h100", "--ttft", "1s", "--tpot", "100ms", "--num-requests", "200",
          "--jobs", "1", "--affinity", "low", "--no-colocated", "-o", str(out), *extra])
    return ServingConfig.load(out), Plan.from_yaml((tmp_path / "serving.plan.yaml").read_text())


def _check_groups_match_plan(cfg: ServingConfig, plan: Plan) -> None:
    """Each placement group holds exactly the ranks of one planned node group: one node per group,
    both phases in it, every planned segment in exactly one group."""
    pools = {"prefill": cfg.prefill, "decode": cfg.decode}
    node_of = {(s.role, s.instance, s.stage): s.node for s in plan.placement}
    specs = group_specs(cfg)
    assert len(specs) == plan.replicas * cfg.placement.node_groups
    seen = set()
    for spec in specs:
        stages = {(role, i, r // pools[role].tp) for role, i, r in spec.ranks}
        assert len({node_of[s] for s in stages}) == 1, (spec.name, stages)  # one planned node
        assert {role for role, *_ in stages} == {"prefill", "decode"}  # paired
        assert len(spec.bundles) <= 8  # fits the node's GPUs
        assert all(b == {"CPU": pools[role].num_cpus, "GPU": 1.0} for b, (role, *_) in zip(spec.bundles, spec.ranks))
        seen |= stages
    assert seen == set(node_of)


def test_algorithm2_plan_pairs_stages_on_one_node_through_the_yaml(tmp_path, capsys):
    cfg, plan = _plan(tmp_path, "--nodes", "2", "--gpus-per-node", "8")
    assert plan.algorithm == "low-affinity" and plan.replicas >= 1
    assert (cfg.placement.units, cfg.placement.node_groups) == (plan.replicas, 1)
    assert cfg.prefill.instances % plan.replicas == 0 and cfg.decode.instances % plan.replicas == 0
    assert ServingConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml())) == cfg  # round trip
    _check_groups_match_plan(cfg, plan)


def test_cross_node_stages_one_group_per_node_group():
    """A unit whose pipeline spans two nodes: stage 0 of both instances on one, stage 1 on the other."""
    cfg = ServingConfig.from_dict({"prefill": {"instances": 2, "tp": 2, "pp": 2}, "decode": {"instances": 2, "pp": 2},
                                   "placement": {"units": 2, "node_groups": 2}})
    specs = group_specs(cfg)
    assert [s.name for s in specs] == ["pdserve-unit0-node0", "pdserve-unit0-node1", "pdserve-unit1-node0",
                                       "pdserve-unit1-node1"]
    assert specs[1].ranks == (("prefill", 0, 2), ("prefill", 0, 3), ("decode", 0, 1))
    assert specs[2].ranks == (("prefill", 1, 0), ("prefill", 1, 1), ("decode", 1, 0))
    assert specs[0].demand == {"CPU": 3.0}
    ranks = defaultdict(int)
    for s in specs:
        for role, i, _ in s.ranks:
            ranks[(role, i)] += 1
    assert ranks == {("prefill", 0): 4, ("prefill", 1): 4, ("decode", 0): 2, ("decode", 1): 2}


def test_without_pairing_every_instance_is_its_own_group():
    cfg = ServingConfig(prefill=PoolConfig(instances=2, tp=2, resources={"a": 1.0}), decode=PoolConfig())
    specs = group_specs(cfg)
    assert [s.name for s in specs] == ["pdserve-prefill-0", "pdserve-prefill-1", "pdserve-decode-0"]
    assert specs[1].ranks == (("prefill", 1, 0), ("prefill", 1, 1)) and specs[1].demand == {"CPU": 2.0, "a": 2.0}


@pytest.mark.parametrize("data, message", [
    ({"prefill": {"instances": 3}, "placement": {"units": 2}}, "placement.units: 2 does not divide prefill.instances (3)"),
    ({"prefill": {"pp": 2}, "decode": {"pp": 3}, "placement": {"units": 1, "node_groups": 2}}, "placement.node_groups: 2 does not divide decode.pp (3)"),
    ({"placement": {"node_groups": 2}}, "placement.node_groups: needs placement.units > 0"),
    ({"mode": "colocated", "placement": {"units": 1}}, "placement.units: pairs prefill with decode stages"),
    ({"placement": {"units": -1}}, "placement.units: must be >= 0"),
    ({"placement": {"unit": 1}}, "placement.unit: unknown field"),
])
def test_pairings_the_pools_cannot_split_into_are_rejected_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServingConfig.from_dict(data)
