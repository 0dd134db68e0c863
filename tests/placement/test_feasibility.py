"""Pools the cluster can never hold fail at once, saying which pool needs what and what nodes have."""

from __future__ import annotations

import pytest

from pdserve.config import PoolConfig
from pdserve.placement.feasibility import LaunchError, check_placeable, describe


def _node(ip: str, alive: bool = True, **res: float) -> dict:
    own = {f"node:{ip}": 1.0, "memory": 1e9, "object_store_memory": 1e8, "CPU_group_0_abc": 1.0}  # not shown
    return {"NodeManagerAddress": ip, "Alive": alive, "Resources": {**own, **res}}


NODES = [_node("10.0.0.1", CPU=4, node_a=1), _node("10.0.0.2", CPU=4, GPU=2, node_b=1)]


def test_pools_that_fit_pass() -> None:
    check_placeable([("prefill", PoolConfig(instances=2, resources={"node_a": 0.5})),
                     ("decode", PoolConfig(tp=2, num_gpus=1, resources={"node_b": 0.1}))], NODES)


def test_an_instance_larger_than_any_node_names_pool_need_and_nodes() -> None:
    with pytest.raises(LaunchError) as e:
        check_placeable([("prefill", PoolConfig(resources={"node_a": 1})),
                         ("decode", PoolConfig(tp=4, num_gpus=1))], NODES)
    msg = str(e.value)
    assert "no node can hold one decode instance ({CPU: 4, GPU: 4} on one node)" in msg
    assert "node 10.0.0.1 has {CPU: 4, node_a: 1}; node 10.0.0.2 has {CPU: 4, GPU: 2, node_b: 1}" in msg
    assert "prefill" not in msg.split(".")[0]  # prefill fits; only decode is named as the problem


def test_total_demand_beyond_the_cluster_and_dead_nodes_do_not_count() -> None:
    nodes = [*NODES, _node("10.0.0.3", alive=False, CPU=64, node_a=8)]
    with pytest.raises(LaunchError, match=r"the pools need node_a: 3 \(cluster total 1\)"):
        check_placeable([("prefill", PoolConfig(instances=3, resources={"node_a": 1}))], nodes)


def test_describe_reports_what_is_available_now() -> None:
    text = describe([("decode", PoolConfig())], NODES, {"CPU": 1.0})
    assert text.startswith("decode needs 1 instance(s) of {CPU: 1} on one node each.")
    assert text.endswith("Available now: {CPU: 1}.")


def test_paired_units_are_checked_per_node_group_not_per_instance() -> None:
    """Algorithm 2: a pp-2 instance may span two nodes (each holds one stage of both phases), so
    the groups are what must fit one node; a group no node holds is named with its need."""
    pools = [("prefill", PoolConfig(pp=2, num_cpus=1.5)), ("decode", PoolConfig(pp=2, num_cpus=0.5))]
    split = [_node("10.0.0.1", CPU=2), _node("10.0.0.2", CPU=2)]
    with pytest.raises(LaunchError, match=r"no node can hold one prefill instance \(\{CPU: 3\}"):
        check_placeable(pools, split)  # unpaired: a whole instance per node
    check_placeable(pools, split, [(f"pdserve-unit0-node{g}", {"CPU": 2.0}) for g in range(2)])
    with pytest.raises(LaunchError, match=r"no node can hold pdserve-unit0-node0 \(\{CPU: 4\} on one node"):
        check_placeable(pools, split, [("pdserve-unit0-node0", {"CPU": 4.0})])
