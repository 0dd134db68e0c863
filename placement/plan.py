"""A `Plan`: the search's answer in a form a human reviews and `pdserve serve` runs. Round-trips to
YAML; `serving_config()` turns it into the `pdserve.config.ServingConfig` the serve command reads
(colocated plans put their instances in the decode pool, whose worker runs both phases)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pdserve.config import PoolConfig, ServingConfig, SLOConfig
from pdserve.placement.candidates import Unit
from pdserve.placement.hardware import ClusterSpec
from pdserve.placement.packing import pack
from pdserve.placement.search import Scored


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
    model: str
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

    @classmethod
    def from_scored(cls, s: Scored, *, model: str, cluster: ClusterSpec, codec: str,
                    ttft_s: float, tpot_s: float, attainment: float) -> Plan:
        u: Unit = s.unit
        segments = pack(u, s.replicas, cluster) or []
        colocated = u.decode is None
        prefill = None if colocated else PoolPlan(instances=u.num_prefill * s.replicas, tp=u.prefill.tp, pp=u.prefill.pp)
        decode_cfg, n_decode = (u.prefill, 1) if colocated else (u.decode, u.num_decode)
        assert decode_cfg is not None
        return cls(model=model, mode=u.mode, algorithm=u.algorithm, prefill=prefill,
                   decode=PoolPlan(instances=n_decode * s.replicas, tp=decode_cfg.tp, pp=decode_cfg.pp),
                   colocated_policy=u.colocated_policy, codec=codec, ttft_s=ttft_s, tpot_s=tpot_s,
                   attainment=attainment, goodput_rps=round(s.planned_goodput, 4),
                   per_gpu_goodput_rps=round(s.per_gpu_goodput, 4), num_gpus=s.num_gpus, replicas=s.replicas,
                   unit=u.describe(),
                   placement=[SegmentPlan(role="decode" if g.role == "colocated" else g.role, instance=g.instance,
                                          stage=g.stage, node=g.node, gpus=list(g.gpus)) for g in segments])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump({"plan": self.to_dict()}, sort_keys=False)

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
        """The serving config for this plan; `base` supplies everything a plan does not decide
        (router, engine, batch limits), `model` the name or path `pdserve serve` loads."""
        base = base or ServingConfig()

        def pool(cfg: PoolConfig, p: PoolPlan) -> PoolConfig:
            return dataclasses.replace(cfg, instances=p.instances, tp=p.tp, pp=p.pp, num_gpus=1.0)

        prefill = pool(base.prefill, self.prefill) if self.prefill else base.prefill
        return base.replace(model=model or self.model, mode=self.mode, colocated_policy=self.colocated_policy,
                            prefill=prefill, decode=pool(base.decode, self.decode),
                            kvtransfer=dataclasses.replace(base.kvtransfer, codec=self.codec),
                            slo=SLOConfig(ttft_s=self.ttft_s, tpot_s=self.tpot_s, attainment=self.attainment))
