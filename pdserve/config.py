"""The serving config: YAML in, frozen dataclasses out. `pdserve plan` writes one, `pdserve serve` reads one.

Every field has a default that runs on a laptop (1 prefill + 1 decode instance on CPU with
SmolLM2-135M). Loading rejects unknown keys and wrong types with the dotted path of the field
(`decode.tp: expected int, got 'two'`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pdserve.config_dicts import ConfigError as ConfigError  # the config's error type, importable from here
from pdserve.config_dicts import build_dataclass

Mode = Literal["disaggregated", "colocated"]
ColocatedPolicy = Literal["prefill_priority", "chunked"]
TransportName = Literal["loopback", "grpc", "torch"]
OnFailure = Literal["recompute", "fail"]
CodecName = Literal["auto", "raw", "int8", "fp8", "int4", "int4_zstd"]
PrefillPolicyName = Literal["least_tokens", "cache_aware", "round_robin"]
DecodePolicyName = Literal["least_kv", "cache_aware", "round_robin"]


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cuda: one whole GPU per rank (pools' num_gpus: 1)
    kv_cache_memory_gb: float = 1.0  # the KV pool on CPU (on CUDA too when gpu_memory_utilization is None)
    gpu_memory_utilization: float | None = 0.9
    """CUDA: the fraction of the GPU's memory this engine may use in all (weights, activations, KV);
    the KV pool gets what a warm-up forward leaves of it. None: a fixed kv_cache_memory_gb pool."""
    max_model_len: int = 2048
    num_threads: int = 1  # torch threads per engine process; several engines share the box
    attention_backend: Literal["auto", "paged", "reference"] = "auto"  # auto: paged on CPU fp32, else reference
    cuda_graphs: bool = True  # on CUDA, replay decode steps as CUDA graphs (engine/cuda_graphs.py)
    enable_prefix_caching: bool = False  # keep full blocks' KV for reuse by later prompts (engine/prefix_cache.py)

    def __post_init__(self) -> None:
        _positive(self, "block_size", "kv_cache_memory_gb", "max_model_len", "num_threads", "gpu_memory_utilization")
        if self.gpu_memory_utilization is not None and self.gpu_memory_utilization > 1:
            raise ConfigError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class PoolConfig:
    """One phase's pool: `instances` copies of a (tp × pp) engine."""

    instances: int = 1
    tp: int = 1
    pp: int = 1
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget (the chunk size under `chunked`)
    num_cpus: float = 1.0  # per worker actor
    num_gpus: float = 0.0  # per worker actor (tp × pp actors per instance)
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor

    def __post_init__(self) -> None:
        _positive(self, "instances", "tp", "pp", "max_num_seqs", "max_num_batched_tokens")

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class KVTLSConfig:
    """PEM files that turn on TLS for the KV channels: every KV control RPC and every gRPC data stream.
    Each worker serves with `cert`/`key` and verifies its peers' certificates against `ca`. The paths
    are read on the workers' nodes when their KV ends start (a missing file fails that start)."""

    cert: str = ""  # this worker's certificate (chain), PEM
    key: str = ""  # its private key, PEM
    ca: str = ""  # the CA bundle that signed the peers' certificates, PEM (a self-signed cert is its own CA)

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name}: must name a PEM file")


TensorLane = Literal["auto", "off", "group", "ipc"]


@dataclass(frozen=True)
class KVTransferConfig:
    transport: TransportName = "grpc"
    codec: CodecName = "raw"
    link_gbps: float | None = None  # link bandwidth in GB/s (bytes) for codec=auto; measured when None
    lease_s: float = 60.0  # prefill frees exported blocks nobody pulled within this time
    timeout_s: float = 30.0
    on_failure: OnFailure = "recompute"  # a failed pull: decode recomputes the prompt, or the request fails
    bind_host: str | None = None  # KV endpoints listen here; None: the Ray node IP of the worker's node
    advertise_host: str | None = None  # what peers dial; None: bind_host (the node IP if bind_host is 0.0.0.0)
    port_range: str | None = None  # "20000-20999": KV listening ports (firewalled clusters); None: any free port
    connect_timeout_s: float = 5.0  # launch's reachability check of every prefill KV endpoint from each decode
    tls: KVTLSConfig | None = None  # TLS on the control RPCs and the grpc transport's data; None: plaintext
    layerwise: bool = True
    """Layer-wise streaming: prefill exports a prompt's KV before the forward that writes it, the
    router hands the handle to decode at once and decode pulls each layer as the forward writes it;
    the first token follows when sampled. False: export after the forward, hand over with the first
    token. Instances with tp × pp > 1 always use the latter."""
    tensor_lane: TensorLane = "auto"
    """transport torch: how KV tensors travel between the pair. group: the pair's own process group,
    NCCL between two GPUs, gloo between two CPU pools; ipc: CUDA IPC (both ends on one node's GPUs);
    auto: group when both ends' pools are on the same device type, else bytes over gloo; off: bytes."""

    def __post_init__(self) -> None:
        _positive(self, "lease_s", "timeout_s", "connect_timeout_s")
        if self.tls is not None and self.transport == "torch":
            raise ConfigError("tls: the torch transport's data (gloo/NCCL) cannot be encrypted; use transport grpc")
        for name in ("bind_host", "advertise_host"):
            v = getattr(self, name)
            if v is not None and (not v.strip() or " " in v):
                raise ConfigError(f"{name}: must be a host name or IP address, got {v!r}")
        if self.advertise_host in ("0.0.0.0", "::"):
            raise ConfigError(f"advertise_host: peers cannot dial the wildcard address {self.advertise_host!r}")
        if self.port_range is not None:
            self.ports  # validates

    @property
    def ports(self) -> tuple[int, int] | None:
        """`port_range` as (lowest, highest), both included."""
        if self.port_range is None:
            return None
        lo, sep, hi = self.port_range.partition("-")
        if not (sep and lo.strip().isdigit() and hi.strip().isdigit()
                and 0 < int(lo) <= int(hi) < 65536):
            raise ConfigError(f"port_range: expected 'LOW-HIGH' with 0 < LOW <= HIGH < 65536, got {self.port_range!r}")
        return int(lo), int(hi)


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"  # on the router's node; 0.0.0.0 exposes the API to the network
    port: int = 8000
    node_ip: str | None = None  # the Ray node (by IP) the router runs on; None: where `pdserve serve` runs
    api_key: str | None = None
    prefill_policy: PrefillPolicyName = "least_tokens"
    decode_policy: DecodePolicyName = "least_kv"
    max_pending_requests: int = 256  # beyond this the router answers 429 with Retry-After
    request_timeout_s: float = 600.0
    # Conditional disaggregation (router/pd_decision.py; disaggregated mode only): the decode instance
    # prefills a request itself when at most `pd_threshold_tokens` of its prompt are uncached there,
    # or when the prefill pool has more than `pd_prefill_queue_limit` prompt tokens queued. 0 / None:
    # always the prefill pool. `pdserve plan` chooses the threshold.
    pd_threshold_tokens: int = 0
    pd_prefill_queue_limit: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "max_pending_requests", "request_timeout_s")
        _positive(self, "pd_threshold_tokens", "pd_prefill_queue_limit", or_zero=True)
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port: must be in [0, 65535], got {self.port}")

    @property
    def conditional(self) -> bool:
        """Whether conditional disaggregation is on (a threshold or a queue limit is set)."""
        return self.pd_threshold_tokens > 0 or self.pd_prefill_queue_limit is not None


@dataclass(frozen=True)
class SLOConfig:
    """The latency targets, the one SLO type of the project: the serving config's `slo` section,
    what `pdserve bench` scores requests against and what `pdserve plan` maximises goodput under.
    A request meets it when its TTFT <= ttft_s and its TPOT <= tpot_s (a one-token output has no
    TPOT); a run meets it when at least `attainment` of its requests do."""

    ttft_s: float = 1.0
    tpot_s: float = 0.2
    attainment: float = 0.9
    """Target share of requests meeting both latency targets."""

    def __post_init__(self) -> None:
        _positive(self, "ttft_s", "tpot_s")
        if not 0 < self.attainment <= 1:
            raise ConfigError(f"attainment: must be in (0, 1], got {self.attainment}")

    def scaled(self, scale: float) -> SLOConfig:
        """Both latency targets × `scale` (DistServe's SLO scale), the attainment target kept."""
        return dataclasses.replace(self, ttft_s=self.ttft_s * scale, tpot_s=self.tpot_s * scale)


@dataclass(frozen=True)
class PlacementConfig:
    """Instances that must share a node: DistServe's Algorithm 2 (`pdserve plan`'s low-affinity
    plans) keeps the prefill and decode stages of one unit on one node, so KV moves inside it."""

    units: int = 0
    """0: every instance is its own placement group, on any node its pool's resources fit. N > 0:
    each pool splits into N equal units in order (prefill-0.. and decode-0.. in unit 0, ...), and
    the ranks of a unit's prefill and decode instances share STRICT_PACK placement groups."""
    node_groups: int = 1
    """Nodes per unit: pipeline stage s of a pp-stage instance goes to group s × node_groups // pp
    (1: the whole unit on one node). Must divide both pools' pp."""

    def __post_init__(self) -> None:
        _positive(self, "node_groups")
        _positive(self, "units", or_zero=True)


@dataclass(frozen=True)
class ServingConfig:
    model: str = "smollm2-135m"
    mode: Mode = "disaggregated"
    colocated_policy: ColocatedPolicy = "prefill_priority"
    engine: EngineConfig = field(default_factory=EngineConfig)
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)
    kvtransfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def __post_init__(self) -> None:
        for name in self.pool_names:
            _check_gpus(self.engine.device, getattr(self, name), name)
        self._check_placement()
        for name in ("prefill_policy", "decode_policy"):
            if getattr(self.router, name) == "cache_aware" and not self.engine.enable_prefix_caching:
                raise ConfigError(f"router.{name}: cache_aware needs engine.enable_prefix_caching: true")
        if self.router.conditional and self.mode != "disaggregated":
            raise ConfigError("router.pd_threshold_tokens: conditional disaggregation needs mode: disaggregated")

    def _check_placement(self) -> None:
        pl = self.placement
        if pl.units == 0:
            if pl.node_groups != 1:
                raise ConfigError("placement.node_groups: needs placement.units > 0")
            return
        if self.mode != "disaggregated":
            raise ConfigError("placement.units: pairs prefill with decode stages; needs mode: disaggregated")
        for role, pool in (("prefill", self.prefill), ("decode", self.decode)):
            if pool.instances % pl.units:
                raise ConfigError(f"placement.units: {pl.units} does not divide {role}.instances ({pool.instances})")
            if pool.pp % pl.node_groups:
                raise ConfigError(f"placement.node_groups: {pl.node_groups} does not divide {role}.pp ({pool.pp})")

    @property
    def layerwise_kv(self) -> bool:
        """Stream KV layer by layer (`kvtransfer.layerwise`): disaggregated, both pools tp × pp = 1."""
        return self.kvtransfer.layerwise and self.mode == "disaggregated" and all(
            p.tp * p.pp == 1 for p in (self.prefill, self.decode))

    @property
    def pool_names(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.mode == "disaggregated" else ("decode",)

    def resolve_device(self, cluster_gpus: float) -> ServingConfig:
        """Resolve `engine.device: auto` once, at launch, against the Ray cluster's GPUs: cuda with one
        whole GPU per rank (pools left at num_gpus 0 get 1) when it has any, cpu when it has none."""
        device = self.engine.device
        if device == "cpu" or (device == "auto" and cluster_gpus <= 0):
            for name in self.pool_names:
                n = getattr(self, name).num_gpus
                if n and cluster_gpus <= 0:
                    raise ConfigError(f"{name}.num_gpus: {n}, but the Ray cluster has no GPUs")
            return self.replace(engine=dataclasses.replace(self.engine, device="cpu"))
        if cluster_gpus <= 0:
            raise ConfigError("engine.device: cuda, but the Ray cluster has no GPUs")
        pools = {n: dataclasses.replace(getattr(self, n), num_gpus=getattr(self, n).num_gpus or 1.0)
                 for n in self.pool_names}
        return self.replace(engine=dataclasses.replace(self.engine, device="cuda"), **pools)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ServingConfig:
        return build_dataclass(cls, data or {}, "")

    @classmethod
    def load(cls, path: str | Path) -> ServingConfig:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> ServingConfig:
        return dataclasses.replace(self, **changes)


def _check_gpus(device: str, pool: PoolConfig, name: str) -> None:
    """A rank drives one whole GPU: NCCL refuses two ranks on one GPU, and Ray's num_gpus 0 hides them."""
    n = pool.num_gpus
    if n > 1:
        raise ConfigError(f"{name}.num_gpus: {n}, but a rank drives one GPU; use tp/pp for more GPUs per instance")
    if device != "cpu" and 0 < n < 1:
        raise ConfigError(f"{name}.num_gpus: {n} would put two ranks on one GPU, which NCCL refuses "
                          "(duplicate GPU); use 1, one whole GPU per rank")
    if device == "cuda" and n == 0:
        raise ConfigError(f"{name}.num_gpus: 0 hides every GPU from the actor (Ray sets CUDA_VISIBLE_DEVICES=\"\"); "
                          "device cuda needs num_gpus: 1")


def _positive(obj: object, *names: str, or_zero: bool = False) -> None:
    """Each field > 0 (>= 0 with `or_zero`) or None. Messages name the field only; `build_dataclass` prefixes
    the section's dotted path."""
    for n in names:
        v = getattr(obj, n)
        if v is not None and not (v >= 0 if or_zero else v > 0):
            raise ConfigError(f"{n}: must be {'>=' if or_zero else '>'} 0, got {v!r}")
