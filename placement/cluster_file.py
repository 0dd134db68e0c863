"""The cluster a plan is for, read from Ray's cluster-launcher YAML (`ray up cluster.yaml`).

Each worker node type in `available_node_types` gives: GPUs per node (`resources.GPU`), CPUs,
the custom resources the serving config requests to pin a pool to it, and how many such nodes
the cluster may have (`max_workers`). The GPU model comes from the instance type (AWS
`InstanceType`, see `INSTANCE_GPUS`) unless the caller names it. A node type whose name or
custom resource contains "prefill" (or "decode") hosts that phase only; with one type per phase
the planner keeps the phases on their own nodes (`ClusterSpec.prefill_nodes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from pdserve.placement.hardware import ClusterSpec, GPUSpec, load_gpu

# AWS GPU instance types → the GPU catalog's names (data/gpus.yaml)
INSTANCE_GPUS = {"p4d.24xlarge": "a100-40g", "p4de.24xlarge": "a100-80g", "p5.48xlarge": "h100",
                 "p5e.48xlarge": "h200", "p5en.48xlarge": "h200", "g6.48xlarge": "l4", "g6.12xlarge": "l4"}
_RAY_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


@dataclass(frozen=True)
class NodeType:
    name: str
    gpus: int
    cpus: float
    max_workers: int
    custom: dict[str, float]  # custom resources of one node (what a pool's `resources` may request)
    gpu: str | None  # catalog GPU name from the instance type, None when unknown

    @property
    def role(self) -> str | None:
        """'prefill' or 'decode' when the name or a custom resource says so, else None (either)."""
        words = " ".join([self.name, *self.custom]).lower()
        roles = [r for r in ("prefill", "decode") if r in words]
        return roles[0] if len(roles) == 1 else None

    @property
    def pin(self) -> dict[str, float]:
        """What one worker actor requests to land on this node type: 1 of its custom resource."""
        return {name: 1.0 for name in sorted(self.custom)[:1]}


@dataclass(frozen=True)
class ClusterFile:
    path: str
    node_types: tuple[NodeType, ...]  # worker node types with GPUs (or all, for a CPU cluster)

    def for_role(self, role: str) -> NodeType:
        """The node type a pool of `role` runs on (its own type if there is one, else the first)."""
        return next((t for t in self.node_types if t.role == role), self.node_types[0])

    @property
    def phase_split(self) -> bool:
        return {t.role for t in self.node_types} == {"prefill", "decode"}

    def cluster(self, gpu: str | None, inter_node_gbps: float, intra_node_gbps: float | None) -> ClusterSpec:
        types = self.node_types
        if len({t.gpus for t in types}) != 1:
            raise ValueError(f"{self.path}: node types differ in GPUs per node ({', '.join(f'{t.name}: {t.gpus}' for t in types)})")
        if gpu is None and any(t.gpu is None for t in types):
            raise ValueError(f"{self.path}: cannot tell the GPU model of every node type "
                             f"({', '.join(f'{t.name}: {t.gpu}' for t in types)}); pass --gpu")
        names = {gpu} if gpu else {t.gpu for t in types}
        prefill_nodes, decode_gpu = None, None
        if self.phase_split:
            prefill_nodes = sum(t.max_workers for t in types if t.role == "prefill")
            if not gpu and self.for_role("prefill").gpu != self.for_role("decode").gpu:
                names, decode_gpu = {self.for_role("prefill").gpu}, load_gpu(str(self.for_role("decode").gpu))
        if len(names) != 1:
            raise ValueError(f"{self.path}: node types with different GPUs ({', '.join(f'{t.name}: {t.gpu}' for t in types)}) "
                             "need one node type per phase")
        spec: GPUSpec = load_gpu(str(names.pop()))
        return ClusterSpec(num_nodes=sum(t.max_workers for t in types), gpus_per_node=types[0].gpus, gpu=spec,
                           inter_node_gbps=inter_node_gbps, intra_node_gbps=intra_node_gbps,
                           prefill_nodes=prefill_nodes, decode_gpu=decode_gpu)


def load_cluster_file(path: str | Path) -> ClusterFile:
    data = yaml.safe_load(Path(path).read_text())
    types = data.get("available_node_types") if isinstance(data, dict) else None
    if not isinstance(types, dict) or not types:
        raise ValueError(f"{path}: no available_node_types (is this a Ray cluster-launcher config?)")
    head = data.get("head_node_type")
    out = []
    for name, t in types.items():
        res = dict(t.get("resources") or {})
        instance = (t.get("node_config") or {}).get("InstanceType")
        out.append(NodeType(name=name, gpus=int(res.get("GPU", 0)), cpus=float(res.get("CPU", 0)),
                            max_workers=int(t.get("max_workers", 0)),
                            custom={k: float(v) for k, v in res.items() if k not in _RAY_RESOURCES},
                            gpu=INSTANCE_GPUS.get(instance)))
    workers = [t for t in out if t.name != head and t.max_workers > 0]
    gpu_types = [t for t in workers if t.gpus > 0]
    if not workers:
        raise ValueError(f"{path}: no worker node type with max_workers > 0")
    return ClusterFile(str(path), tuple(gpu_types or workers))
