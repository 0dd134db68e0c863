"""The placement search: per-phase goodputs (DistServe Algorithm 1's inner loop), units from
Algorithms 1 and 2 and the colocated alternative, a joint-attainment check of the most promising
units, and the ranking. Every simulation of one search uses the same seeded trace.

Ranking: with a target rate, fewest GPUs that reach it; without, the highest planned goodput on
the whole cluster (a unit's goodput × the replicas that fit), then per-GPU goodput.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from pdserve.bench.metrics import SLO
from pdserve.placement.candidates import (PhaseConfig, Unit, colocated_units, low_affinity_units,
                                          phase_configs, ratio_units)
from pdserve.placement.deployment import Deployment
from pdserve.placement.goodput import Metric, goodput
from pdserve.placement.hardware import ClusterSpec
from pdserve.placement.latency import InstanceLatency, LatencySource, instance_latency
from pdserve.placement.model_spec import ModelSpec
from pdserve.placement.packing import max_replicas
from pdserve.placement.transfer import TransferModel
from pdserve.placement.workload import Trace, Workload

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    model: ModelSpec
    cluster: ClusterSpec
    source: LatencySource
    workload: Workload
    slo: SLO
    colocated_source: LatencySource | None = None  # default: `source` (pdserve runs one engine)
    target_rate: float | None = None
    codec: str = "raw"
    affinity: Literal["high", "low", "both"] = "both"
    include_colocated: bool = True
    num_requests: int = 1000
    seed: int = 0
    prefill_token_budget: int = 4096
    max_num_seqs: int = 512
    decode_token_limit: int | None = None
    verify_top_k: int = 4  # units per algorithm checked by joint simulation
    jobs: int = 1  # worker processes for the simulations


@dataclass(frozen=True)
class Scored:
    unit: Unit
    unit_goodput: float  # req/s of one unit, joint TTFT+TPOT attainment
    replicas: int

    @property
    def planned_goodput(self) -> float:
        return self.unit_goodput * self.replicas

    @property
    def num_gpus(self) -> int:
        return self.unit.num_gpus * self.replicas

    @property
    def per_gpu_goodput(self) -> float:
        return self.unit_goodput / self.unit.num_gpus


@dataclass(frozen=True)
class SearchResult:
    ranked: tuple[Scored, ...]  # best first; only units that fit the cluster
    feasible: bool  # the best one meets the SLOs (and the target rate, if any)
    phase_goodput: dict[tuple[str, PhaseConfig], float] = field(default_factory=dict)
    num_simulated: int = 0
    elapsed_s: float = 0.0

    @property
    def best(self) -> Scored | None:
        return self.ranked[0] if self.ranked else None


def search(spec: SearchSpec, progress: Progress | None = None) -> SearchResult:
    started = time.perf_counter()
    trace = spec.workload.trace(spec.num_requests, spec.seed)
    lat = phase_latencies(spec, spec.source)
    configs = set(lat)
    # 1. per-phase goodput of every config (Algorithm 1's inner loop; feeds Algorithm 2's estimate)
    phase_jobs = [(role, c) for c in sorted(configs) for role in ("prefill", "decode")] \
        if spec.affinity in ("high", "low", "both") else []
    values = _run([(_phase_deployment(spec, role, lat[c]), trace, spec.slo, "ttft" if role == "prefill" else "tpot")
                   for role, c in phase_jobs], spec.jobs, progress, "phase", [f"{r} {c}" for r, c in phase_jobs])
    g = dict(zip(phase_jobs, values))
    # 2. units, estimated from the phase goodputs; the best few per algorithm are verified jointly
    units: list[Unit] = []
    if spec.affinity in ("high", "both"):
        units += _top(spec, _high_units(spec, g), g)
    if spec.affinity in ("low", "both"):
        units += _top(spec, [u for u in low_affinity_units(configs, spec.model, spec.cluster)
                             if u.prefill in configs and u.decode in configs], g)
    units = list({(u.prefill, u.num_prefill, u.decode, u.num_decode, u.intra_node_transfer): u
                  for u in reversed(units)}.values())[::-1]  # one simulation per distinct unit
    colo_lat = phase_latencies(spec, spec.colocated_source) if spec.colocated_source else lat
    if spec.include_colocated:
        units += [u for u in colocated_units(set(colo_lat)) if max_replicas(u, spec.cluster) > 0]
    deps = [unit_deployment(spec, u, colo_lat if u.decode is None else lat) for u in units]
    joint = _run([(d, trace, spec.slo, "joint") for d in deps], spec.jobs, progress, "joint",
                 [u.describe() for u in units])
    scored = [_score(spec, u, gp) for u, gp in zip(units, joint)]
    ranked = tuple(sorted((s for s in scored if s is not None), key=lambda s: _rank_key(spec, s)))
    best = ranked[0] if ranked else None
    feasible = best is not None and best.unit_goodput > 0 and (
        spec.target_rate is None or best.planned_goodput >= spec.target_rate)
    return SearchResult(ranked, feasible, g, len(phase_jobs) + len(units), time.perf_counter() - started)


def phase_latencies(spec: SearchSpec, source: LatencySource) -> dict[PhaseConfig, InstanceLatency]:
    """Memory pruning: configs whose weights (plus one max-length request) do not fit are dropped."""
    out = {}
    for c in phase_configs(spec.model, spec.cluster):
        il = instance_latency(source, spec.model, spec.cluster.gpu, c.tp, c.pp)
        if il is not None:
            out[c] = il
    return out


def _phase_deployment(spec: SearchSpec, role: str, il: InstanceLatency) -> Deployment:
    if role == "prefill":
        return Deployment(prefill=(il,), phases="prefill", prefill_token_budget=spec.prefill_token_budget)
    return Deployment(prefill=(), decode=(il,), phases="decode", max_num_seqs=spec.max_num_seqs,
                      decode_token_limit=spec.decode_token_limit)


def unit_deployment(spec: SearchSpec, unit: Unit, lat: dict[PhaseConfig, InstanceLatency]) -> Deployment:
    common = dict(prefill_token_budget=spec.prefill_token_budget, max_num_seqs=spec.max_num_seqs,
                  decode_token_limit=spec.decode_token_limit)
    if unit.decode is None:
        return Deployment(mode="colocated", prefill=(lat[unit.prefill],), colocated_policy=unit.colocated_policy,
                          **common)
    return Deployment(prefill=(lat[unit.prefill],) * unit.num_prefill, decode=(lat[unit.decode],) * unit.num_decode,
                      transfer=transfer_model(spec.model, spec.cluster, unit, spec.codec), **common)


def transfer_model(model: ModelSpec, cluster: ClusterSpec, unit: Unit, codec: str) -> TransferModel:
    """Intra-node over a device path: every GPU pair of a stage moves its shard in parallel over the
    GPU link. Otherwise the bytes go through host memory: the host path, and across nodes one NIC too."""
    assert unit.decode is not None, "colocated units move no KV"
    if unit.intra_node_transfer and cluster.kv_device_path:
        bw = cluster.intra_node_bytes_per_s * min(unit.prefill.num_gpus, unit.decode.num_gpus)
    elif unit.intra_node_transfer:
        bw = cluster.host_path_bytes_per_s
    else:
        bw = min(cluster.inter_node_bytes_per_s, cluster.host_path_bytes_per_s)
    return TransferModel(kv_bytes_per_token=model.kv_bytes_per_token, bytes_per_s=bw, codec=codec)


def _high_units(spec: SearchSpec, g: dict[tuple[str, PhaseConfig], float]) -> list[Unit]:
    """Every (prefill, decode) pair that fits the cluster, at balancing ratios (Algorithm 1 keeps
    only the per-GPU best of each phase; pairing all of them also covers small clusters)."""
    ps = [c for (r, c), v in g.items() if r == "prefill" and v > 0]
    ds = [c for (r, c), v in g.items() if r == "decode" and v > 0]
    return [u for p in ps for d in ds if p.num_gpus + d.num_gpus <= spec.cluster.num_gpus
            for u in ratio_units(p, d, spec.cluster)]


def _estimate(spec: SearchSpec, u: Unit, g: dict[tuple[str, PhaseConfig], float]) -> Scored | None:
    assert u.decode is not None
    link = 1.0 / transfer_model(spec.model, spec.cluster, u, spec.codec).transfer_s(int(spec.workload.mean_prompt_len))
    est = min(u.num_prefill * g.get(("prefill", u.prefill), 0.0), u.num_decode * g.get(("decode", u.decode), 0.0),
              0.9 * u.num_decode * link)  # each decode instance pulls over its own link, FIFO
    return _score(spec, u, est)


def _top(spec: SearchSpec, units: Sequence[Unit], g: dict[tuple[str, PhaseConfig], float]) -> list[Unit]:
    est = [s for s in (_estimate(spec, u, g) for u in units) if s is not None and s.unit_goodput > 0]
    est.sort(key=lambda s: _rank_key(spec, s))
    return [s.unit for s in est[: spec.verify_top_k]]


def _score(spec: SearchSpec, unit: Unit, unit_goodput: float) -> Scored | None:
    """Replicas: enough for the target rate if given (when they fit), else as many as fit."""
    fit = max_replicas(unit, spec.cluster)
    if fit == 0:
        return None
    if spec.target_rate is not None and unit_goodput > 0:
        need = -(-spec.target_rate // unit_goodput)
        return Scored(unit, unit_goodput, int(min(need, fit)))
    return Scored(unit, unit_goodput, fit)


def _rank_key(spec: SearchSpec, s: Scored) -> tuple:
    if spec.target_rate is not None:
        meets = s.planned_goodput >= spec.target_rate
        return (not meets, s.num_gpus if meets else -s.planned_goodput, -s.per_gpu_goodput, s.unit.describe())
    return (-round(s.planned_goodput, 9), -s.per_gpu_goodput, s.num_gpus, s.unit.describe())


def _goodput_job(job: tuple[Deployment, Trace, SLO, Metric]) -> float:
    return goodput(*job)


def _run(jobs: list[tuple[Deployment, Trace, SLO, Metric]], n_jobs: int, progress: Progress | None,
         stage: str, labels: list[str]) -> list[float]:
    """Goodput of each job, in order; in `n_jobs` processes when there is more than one job."""
    if n_jobs > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(n_jobs, os.cpu_count() or 1)) as pool:
            out = []
            for i, v in enumerate(pool.map(_goodput_job, jobs, chunksize=1)):
                out.append(v)
                if progress:
                    progress(i + 1, len(jobs), f"{stage}: {labels[i]} → {v:.3f} req/s")
            return out
    out = []
    for i, job in enumerate(jobs):
        out.append(_goodput_job(job))
        if progress:
            progress(i + 1, len(jobs), f"{stage}: {labels[i]} → {out[-1]:.3f} req/s")
    return out

