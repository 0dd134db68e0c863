"""A `Plan`: the search's answer in a form a human reviews and `pdserve serve` runs. Round-trips to
YAML; `serving_config()` turns it into the `pdserve.config.ServingConfig` the serve command reads
(colocated plans put their instances in the decode pool, whose worker runs both phases). A plan
file records what it was planned for (hardware, latency source, cluster, workload, engine
settings), so `pdserve simulate plan.yaml` replays exactly that."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pdserve.config import PlacementConfig, PoolConfig, ServingConfig, SLOConfig
from pdserve.placement.candidates import Unit
from pdserve.placement.packing import pack
from pdserve.placement.cluster_file import ClusterFile
from pdserve.placement.sim_deployment import CHUNK_SIZE
from pdserve.placement.deploy import kv_cache_memory_gb, pool_pins, servable_model, transport_for
from pdserve.placement.search import Scored, SearchSpec


@dataclass(frozen=True, kw_only=True)
class PoolPlan:
    instances: int
    tp: int
    pp: int


@dataclass(frozen=True, kw_only=True)
class SegmentPlan:
    """Where one pipeline stage of one instance runs."""

    role: str
    instance: int
    stage: int
    node: int
    gpus: list[int]


@dataclass(frozen=True, kw_only=True)
class Plan:
    model: str  # what `pdserve serve` loads (see `model_note`)
    mode: Literal["disaggregated", "colocated"]
    algorithm: str
    prefill: PoolPlan | None
    decode: PoolPlan
    colocated_policy: Literal["prefill_priority", "chunked"] = "prefill_priority"
    codec: str = "raw"
    ttft_s: float
    tpot_s: float
    attainment: float
    goodput_rps: float  # planned: one unit's goodput × replicas
    per_gpu_goodput_rps: float
    num_gpus: int
    replicas: int
    unit: str  # human-readable unit, e.g. "1×P TP4 + 1×D TP2×PP2"
    placement: list[SegmentPlan] = field(default_factory=list)
    model_note: str = ""  # non-empty: `pdserve serve` cannot load `model` as written (plan-only)
    planned_for: dict[str, Any] = field(default_factory=dict)
    """What the plan assumed: model (catalog name), hardware, latency source, cluster, workload,
    engine settings (`pdserve simulate` of this file re-uses every one of them)."""
    deploy: dict[str, Any] = field(default_factory=dict)
    """Engine sizing, per-pool Ray resources and KV transport (deploy.py) for `serving_config`."""
    explain: dict[str, Any] = field(default_factory=dict)  # explain.py: why this plan, and what next

    @classmethod
    def from_scored(cls, s: Scored, spec: SearchSpec, *, model_arg: str | None = None,
                    cluster_file: ClusterFile | None = None, explain: dict[str, Any] | None = None,
                    workload_arg: str | None = None) -> Plan:
        u: Unit = s.unit
        cluster = spec.cluster
        segments = pack(u, s.replicas, cluster) or []
        colocated = u.decode is None
        prefill = None if colocated else PoolPlan(instances=u.num_prefill * s.replicas, tp=u.prefill.tp, pp=u.prefill.pp)
        decode_cfg, n_decode = (u.prefill, 1) if colocated else (u.decode, u.num_decode)
        assert decode_cfg is not None
        model, note = servable_model(spec.model, model_arg or spec.model.name)
        return cls(model=model, mode=u.mode, algorithm=u.algorithm, prefill=prefill,
                   decode=PoolPlan(instances=n_decode * s.replicas, tp=decode_cfg.tp, pp=decode_cfg.pp),
                   colocated_policy=u.colocated_policy, codec=spec.codec, ttft_s=spec.slo.ttft_s,
                   tpot_s=spec.slo.tpot_s, attainment=spec.slo.attainment, goodput_rps=round(s.planned_goodput, 4),
                   per_gpu_goodput_rps=round(s.per_gpu_goodput, 4), num_gpus=s.num_gpus, replicas=s.replicas,
                   unit=u.describe(),
                   placement=[SegmentPlan(role="decode" if g.role == "colocated" else g.role, instance=g.instance,
                                          stage=g.stage, node=g.node, gpus=list(g.gpus)) for g in segments],
                   model_note=note, planned_for=planned_for(spec, cluster_file, workload_arg),
                   deploy=deployment_settings(spec, u, cluster_file), explain=explain or {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump({"plan": self.to_dict()}, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        data["prefill"] = PoolPlan(**data["prefill"]) if data.get("prefill") else None
        data["decode"] = PoolPlan(**data["decode"])
        data["placement"] = [SegmentPlan(**s) for s in data.get("placement", [])]
        return cls(**data)

    @classmethod
    def from_yaml(cls, text: str) -> Plan:
        data = yaml.safe_load(text)
        if not isinstance(data, dict) or "plan" not in data:
            raise ValueError("plan: expected a YAML mapping with a top-level 'plan' key")
        return cls.from_dict(data["plan"])

    def serving_config(self, base: ServingConfig | None = None, model: str | None = None) -> ServingConfig:
        """The serving config for this plan: pools, engine sizing, resources and transport as
        planned, and for Algorithm 2 the pairing of stages on nodes (`placement`, as `pack`'s
        node groups: one per replica and cross-node stage); `base` supplies the rest (router),
        `model` overrides the model path."""
        base = base or ServingConfig()
        d = self.deploy

        def pool(cfg: PoolConfig, p: PoolPlan, role: str) -> PoolConfig:
            pin = d.get("pools", {}).get(role, {})
            return dataclasses.replace(cfg, instances=p.instances, tp=p.tp, pp=p.pp,
                                       max_num_seqs=d.get("max_num_seqs", cfg.max_num_seqs),
                                       max_num_batched_tokens=pin.get("max_num_batched_tokens",
                                                                      d.get("max_num_batched_tokens", cfg.max_num_batched_tokens)),
                                       num_cpus=pin.get("num_cpus", cfg.num_cpus), num_gpus=pin.get("num_gpus", 1.0),
                                       resources=dict(pin.get("resources", {})))

        engine = dataclasses.replace(base.engine, **d["engine"]) if "engine" in d else base.engine
        router = dataclasses.replace(base.router, **d["router"]) if "router" in d else base.router  # modes_cli.py
        prefill = pool(base.prefill, self.prefill, "prefill") if self.prefill else base.prefill
        placement = base.placement
        if self.algorithm == "low-affinity" and self.prefill:  # Algorithm 2: a unit's stages share nodes
            placement = PlacementConfig(units=self.replicas, node_groups=math.gcd(self.prefill.pp, self.decode.pp))
        kv = dataclasses.replace(base.kvtransfer, transport=d.get("transport", base.kvtransfer.transport),
                                 codec=self.codec if "transport" not in d else d["codec"])
        return base.replace(model=model or self.model, mode=self.mode, colocated_policy=self.colocated_policy,
                            engine=engine, router=router, prefill=prefill, decode=pool(base.decode, self.decode, "decode"),
                            kvtransfer=kv, placement=placement, slo=SLOConfig(ttft_s=self.ttft_s, tpot_s=self.tpot_s,
                                                         attainment=self.attainment))


def planned_for(spec: SearchSpec, cluster_file: ClusterFile | None, workload_arg: str | None = None) -> dict[str, Any]:
    """`workload_arg`: the --workload given; a lengths file is recorded by its path (`source`), so
    `pdserve simulate` of the plan file replays it."""
    c, w = spec.cluster, spec.workload
    source = str(Path(workload_arg).resolve()) if workload_arg and Path(workload_arg).is_file() else None
    return {
        "model": spec.model.name,
        "hardware": dataclasses.asdict(c.gpu),
        "decode_hardware": dataclasses.asdict(c.decode_gpu) if c.decode_gpu else None,
        "source": spec.source.name,
        "cluster": {"num_nodes": c.num_nodes, "gpus_per_node": c.gpus_per_node, "inter_node_gbps": c.inter_node_gbps,
                    "intra_node_gbps": c.intra_node_gbps, "prefill_nodes": c.prefill_nodes,
                    "cluster_file": cluster_file.path if cluster_file else None},
        "workload": {"name": w.name, "source": source, "mean_prompt_len": round(w.mean_prompt_len, 1),
                     "mean_output_len": round(w.mean_output_len, 1), "num_requests": spec.num_requests,
                     "seed": spec.seed},
        "engine": {"prefill_token_budget": spec.prefill_token_budget, "max_num_seqs": spec.max_num_seqs,
                   "decode_token_limit": spec.decode_token_limit, "max_model_len": spec.max_model_len},
    }


def deployment_settings(spec: SearchSpec, unit: Unit, cluster_file: ClusterFile | None) -> dict[str, Any]:
    c = spec.cluster
    gpu = c.gpu_for("decode")  # decode and colocated instances: the engine's device and dtype
    pools = [(c.gpu_for("decode" if unit.decode is None else "prefill"), unit.prefill)]
    pools += [(gpu, unit.decode)] if unit.decode else []
    kv_gb = min(kv_cache_memory_gb(spec.model, g, cfg, spec.prefill_token_budget, spec.max_num_seqs) for g, cfg in pools)
    transport, codec = transport_for(unit, spec.cluster, gpu, spec.codec)
    pins = pool_pins(cluster_file, gpu)
    chunked = unit.decode is None and unit.colocated_policy == "chunked"
    return {
        "engine": {"device": gpu.device, "dtype": "float32" if gpu.device == "cpu" else "bfloat16",
                   "kv_cache_memory_gb": kv_gb, "max_model_len": spec.max_model_len},
        "max_num_seqs": spec.max_num_seqs,
        "max_num_batched_tokens": CHUNK_SIZE if chunked else spec.prefill_token_budget,
        "pools": {role: dataclasses.asdict(pin) for role, pin in pins.items()},
        "transport": transport, "codec": codec,
    }
