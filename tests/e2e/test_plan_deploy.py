"""`pdserve plan --cluster` → `pdserve serve --config` on a two-node namespace cluster
(tests/e2e/netns.py): every instance lands on the node type the plan put it on, and an Algorithm 2
plan's paired prefill and decode stages share the node the plan gave them.

The cluster.yaml below describes the namespace nodes as a launcher would: a prefill and a decode
node type, each with one worker slot (`GPU: 1`: what the planner counts) and the custom resource
its namespace node is started with (netns.py gives each node its name as a resource). A CPU
profile and a small CPU "GPU" spec make the plan a CPU deployment (num_gpus 0) of the real
smollm2-135m whose KV cache fits this box. Nothing in the written serving config is edited."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from pdserve.cli import main
from pdserve.placement.plan import Plan
from tests.e2e.netns import BIN, NetnsCluster, available, serve, wait_for_line

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

READY_S = 600.0
CLUSTER_YAML = textwrap.dedent("""\
    cluster_name: pdserve-netns
    max_workers: 2
    provider: {type: local, head_ip: 10.213.0.1, worker_ips: [10.213.0.2]}
    head_node_type: head
    available_node_types:
      head: {resources: {CPU: 0}, min_workers: 0, max_workers: 0, node_config: {}}
      prefill_cpu: {resources: {CPU: 2, GPU: 1, prefill_node: 1}, min_workers: 1, max_workers: 1, node_config: {}}
      decode_cpu: {resources: {CPU: 2, GPU: 1, decode_node: 1}, min_workers: 1, max_workers: 1, node_config: {}}
    """)
CPU_PROFILE = {"HuggingFaceTB/SmolLM2-135M-Instruct": {"1": {
    "prefill": [20.0, 0.5, 1e-5], "decoding_smallbs": [15.0, 1e-4, 2.0], "decoding_largebs": [15.0, 1e-4, 2.0],
    "decoding_large_small_bs_threshold": 95, "device": "cpu"}}}
CPU_SPEC = {"peak_tflops": 0.2, "mem_gbps": 20, "mem_gb": 0.6, "link_gbps": 1, "device": "cpu"}

# Ray's view of where each actor runs, read from the GCS by a driver in the head's namespace
WHERE = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR")
print("ACTORS " + json.dumps({a["Name"]: a["Address"]["IPAddress"] for a in state.actors().values()
                              if str(a["Name"]).startswith("pdserve-") and a["State"] == "ALIVE"}))
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[NetnsCluster]:
    why = available()
    if why is not None:
        pytest.skip(why)
    with NetnsCluster(["prefill_node", "decode_node"], shared={"pd_slot": 2}) as c:  # head: prefill_cpu's resource
        yield c


def _plan_and_serve(cluster: NetnsCluster, tmp_path: Path, cluster_yaml: str, *flags: str
                    ) -> tuple[Plan, dict[str, str]]:
    """`pdserve plan` for `cluster_yaml`, then `pdserve serve` of the written config as is; returns
    the plan and where (node IP) each pdserve actor runs once the server is ready."""
    (tmp_path / "cluster.yaml").write_text(cluster_yaml)
    (tmp_path / "cpu.json").write_text(json.dumps(CPU_PROFILE))
    (tmp_path / "cpu-small.yaml").write_text(yaml.safe_dump(CPU_SPEC))
    out = tmp_path / "planned.yaml"
    assert main(["plan", "--model", "smollm2-135m", "--cluster", str(tmp_path / "cluster.yaml"),
                 "--gpu", str(tmp_path / "cpu-small.yaml"), "--profile", str(tmp_path / "cpu.json"),
                 "--ttft", "5s", "--tpot", "1s", "--num-requests", "200", "--jobs", "1", "--no-colocated",
                 "-o", str(out), *flags]) == 0
    plan = Plan.from_yaml((tmp_path / "planned.plan.yaml").read_text())
    cfg = yaml.safe_load(out.read_text())
    assert cfg["prefill"]["num_gpus"] == cfg["decode"]["num_gpus"] == 0.0 and cfg["engine"]["device"] == "cpu"
    with serve(cluster, cfg, tmp_path) as (proc, log):
        url = wait_for_line(log, r"ready at (http://\S+)", proc, READY_S).group(1)
        client = cluster.executor(cluster.head)
        assert client.submit(lambda: httpx.get(f"{url}/health", timeout=10).json()).result()["status"] == "ok"
        r = cluster.run(cluster.head, [str(BIN / "python"), "-c", WHERE, cluster.address], timeout_s=120)
        line = next((x for x in r.stdout.splitlines() if x.startswith("ACTORS ")), None)
        assert line is not None, r.stdout + r.stderr
        return plan, json.loads(line.removeprefix("ACTORS "))


def _actor(role: str, instance: int, rank: int) -> str:
    return f"pdserve-{role}-{instance}" + (f"-rank{rank}" if rank else "")


def test_serving_a_plan_places_every_instance_on_its_planned_node_type(cluster: NetnsCluster, tmp_path: Path) -> None:
    plan, landed = _plan_and_serve(cluster, tmp_path, CLUSTER_YAML)
    types = yaml.safe_load(CLUSTER_YAML)["available_node_types"]
    prefill_nodes = plan.planned_for["cluster"]["prefill_nodes"]
    planned = {_actor(s.role, s.instance, 0): "prefill_cpu" if s.node < prefill_nodes else "decode_cpu"
               for s in plan.placement}
    assert set(planned.values()) == {"prefill_cpu", "decode_cpu"}
    ip_of_type = {t: next(n.ip for n in cluster.nodes if n.name in types[t]["resources"]) for t in planned.values()}
    assert {name: ip for name, ip in landed.items() if name in planned} == {
        name: ip_of_type[t] for name, t in planned.items()}, (landed, planned)


PAIRED_YAML = textwrap.dedent("""\
    cluster_name: pdserve-netns
    provider: {type: local, head_ip: 10.213.0.1, worker_ips: [10.213.0.2]}
    head_node_type: head
    available_node_types:
      head: {resources: {CPU: 0}, min_workers: 0, max_workers: 0, node_config: {}}
      cpu_node: {resources: {CPU: 2, GPU: 2, pd_slot: 2}, min_workers: 2, max_workers: 2, node_config: {}}
    """)


def test_algorithm2_plan_keeps_each_stage_pair_on_one_node(cluster: NetnsCluster, tmp_path: Path) -> None:
    """Both nodes of one type (two slots each): Algorithm 2 pairs prefill and decode stages on a
    node. Every rank lands on the node its planned segment names (up to which Ray node is
    planned node 0), and the paired stages share that node."""
    plan, landed = _plan_and_serve(cluster, tmp_path, PAIRED_YAML, "--affinity", "low")
    assert plan.algorithm == "low-affinity"
    tp = {"prefill": plan.prefill.tp, "decode": plan.decode.tp}
    node_ips = {}  # planned node -> the Ray node (IP) its segments landed on
    for s in plan.placement:
        for r in range(s.stage * tp[s.role], (s.stage + 1) * tp[s.role]):
            node_ips.setdefault(s.node, set()).add(landed[_actor(s.role, s.instance, r)])
    assert all(len(ips) == 1 for ips in node_ips.values()), (node_ips, landed)
    assert len({ip for ips in node_ips.values() for ip in ips}) == len(node_ips)  # distinct planned nodes stay distinct
    for node in node_ips:
        assert {s.role for s in plan.placement if s.node == node} == {"prefill", "decode"}  # paired on it
