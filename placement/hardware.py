"""What the planner knows about GPUs and the cluster: a `GPUSpec` per device type (from
`data/gpus.yaml` or a user's YAML file) and a `ClusterSpec` (nodes × GPUs per node, links)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

_GB = 1e9


@dataclass(frozen=True, kw_only=True)
class GPUSpec:
    name: str
    peak_tflops: float  # dense bf16/fp16
    mem_gbps: float  # HBM bandwidth, GB/s
    mem_gb: float  # HBM capacity, GB
    link_gbps: float  # intra-node (NVLink/PCIe) bandwidth per GPU, GB/s
    device: Literal["cuda", "cpu"] = "cuda"  # "cpu": a CPU worker stands in for a GPU (num_gpus 0)
    price_per_hour: float = 0.0  # USD per device-hour (0: unknown), for goodput per dollar

    def __post_init__(self) -> None:
        for name in ("peak_tflops", "mem_gbps", "mem_gb", "link_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"gpu.{name}: must be > 0, got {getattr(self, name)!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"gpu.device: must be cuda or cpu, got {self.device!r}")
        if self.price_per_hour < 0:
            raise ValueError(f"gpu.price_per_hour: must be >= 0, got {self.price_per_hour!r}")

    @property
    def mem_bytes(self) -> float:
        return self.mem_gb * 2**30  # "80 GB" HBM is 80 GiB


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    num_nodes: int
    gpus_per_node: int
    gpu: GPUSpec
    inter_node_gbps: float = 100.0  # network between nodes, Gbit/s
    intra_node_gbps: float | None = None  # GB/s between GPUs of a node; None: the GPU's link
    prefill_nodes: int | None = None
    """Nodes 0..prefill_nodes−1 host only prefill instances and the rest only decode (and
    colocated) instances: a cluster.yaml with a node type per phase. None: any node hosts any."""
    decode_gpu: GPUSpec | None = None
    """The decode nodes' GPU when it differs from `gpu` (Splitwise: prefill on compute-rich GPUs,
    decode on cheaper memory-rich ones); needs `prefill_nodes`."""
    kv_device_path: bool = False
    """True when prefill -> decode KV moves device to device within a node (NCCL or CUDA IPC: the tensor
    transports of kvtransfer/tensor_transport.py). pdserve's serving KV transports (grpc, torch) stage
    through host memory and TCP, so by default every transfer is priced at `host_path_gbps`."""
    host_path_gbps: float = 2.0  # GB/s of a host-staged KV transfer (device->host, TCP, host->device)

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"cluster: need >= 1 node and >= 1 GPU per node, got {self.num_nodes}×{self.gpus_per_node}")
        if self.prefill_nodes is not None and not 0 < self.prefill_nodes < self.num_nodes:
            raise ValueError(f"cluster.prefill_nodes: must be in 1..{self.num_nodes - 1}, got {self.prefill_nodes}")
        if self.decode_gpu is not None and self.prefill_nodes is None:
            raise ValueError("cluster.decode_gpu: a second GPU type needs prefill_nodes (which nodes hold prefill)")
        if not self.inter_node_gbps > 0:
            raise ValueError(f"cluster.inter_node_gbps: must be > 0, got {self.inter_node_gbps}")
        if not self.host_path_gbps > 0:
            raise ValueError(f"cluster.host_path_gbps: must be > 0, got {self.host_path_gbps}")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def gpu_for(self, role: str) -> GPUSpec:
        """The GPU a 'prefill', 'decode' or 'colocated' instance runs on (colocated: decode nodes)."""
        return self.gpu if role == "prefill" or self.decode_gpu is None else self.decode_gpu

    def price_per_hour(self, prefill_gpus: int, decode_gpus: int) -> float:
        """USD per hour of that many GPUs of each pool (0 when a price is unknown)."""
        return prefill_gpus * self.gpu.price_per_hour + decode_gpus * self.gpu_for("decode").price_per_hour

    @property
    def intra_node_bytes_per_s(self) -> float:
        return (self.intra_node_gbps or self.gpu.link_gbps) * _GB

    @property
    def host_path_bytes_per_s(self) -> float:
        return self.host_path_gbps * _GB

    @property
    def inter_node_bytes_per_s(self) -> float:
        return self.inter_node_gbps * _GB / 8


def gpu_catalog() -> dict[str, GPUSpec]:
    text = resources.files("pdserve.placement").joinpath("data/gpus.yaml").read_text()
    return {name: GPUSpec(name=name, **fields) for name, fields in yaml.safe_load(text).items()}


def load_gpu(name_or_path: str) -> GPUSpec:
    """A catalog name (`a100-80g`, `h100`, ...) or a YAML file with GPUSpec's fields."""
    catalog = gpu_catalog()
    key = name_or_path.lower()
    if key in catalog:
        return catalog[key]
    path = Path(name_or_path)
    if path.is_file():
        fields = yaml.safe_load(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: expected a mapping of GPUSpec fields")
        return GPUSpec(**{"name": path.stem, **fields})
    raise ValueError(f"gpu: unknown {name_or_path!r} (known: {', '.join(catalog)}; or a YAML spec file)")
