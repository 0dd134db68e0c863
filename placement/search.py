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

from pdserve.config import SLOConfig
from pdserve.placement.bound import hardware_bound
from pdserve.placement.candidates import (PhaseConfig, Unit, colocated_units, low_affinity_units,
                                          phase_configs, ratio_units)
from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.goodput import MAX_REQUESTS, Metric, attained, counted, goodput, steady_len
from pdserve.placement.hardware import ClusterSpec
from pdserve.placement.latency import InstanceLatency, LatencySource, instance_latency
from pdserve.placement.model_spec import ModelSpec
from pdserve.placement.packing import max_replicas
from pdserve.placement.simulator import simulate
from pdserve.placement.transfer import TransferModel
from pdserve.placement.workload import Trace, WorkloadLengths

Progress = Callable[[int, int, str], None]
CONFIRM_TOP = 2  # leading units re-checked on a longer trace (`_confirm`)
CONFIRM_FACTOR = 10


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    model: ModelSpec
    cluster: ClusterSpec
    source: LatencySource
    workload: WorkloadLengths
    slo: SLOConfig
    colocated_source: LatencySource | None = None  # default: `source` (pdserve runs one engine)
    decode_source: LatencySource | None = None  # decode nodes' source when their GPU differs; default `source`
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

    def __post_init__(self) -> None:
        for name in ("num_requests", "prefill_token_budget", "max_num_seqs", "verify_top_k", "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def max_model_len(self) -> int:
        """The engine's max_model_len: the workload's longest request (prompt + output, rounded up
        to a multiple of 16 tokens), at most the model's context."""
        longest = max(p + o for p, o in zip(self.workload.prompt_lens, self.workload.output_lens))
        return min(self.model.max_model_len, -(-(longest + 1) // 16) * 16)


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
    trace = search_trace(spec)
    lat = phase_latencies(spec, spec.source)
    dlat = phase_latencies(spec, spec.decode_source or spec.source, "decode")
    configs = set(lat) & set(dlat)
    by_role = {"prefill": lat, "decode": dlat}
    # 1. per-phase goodput of every config (Algorithm 1's inner loop; feeds Algorithm 2's estimate)
    phase_jobs = [(role, c) for c in sorted(set(lat) | set(dlat)) for role in ("prefill", "decode") if c in by_role[role]]
    values = run_jobs([_job(spec, _phase_deployment(spec, role, by_role[role][c]), trace, "ttft" if role == "prefill" else "tpot")
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
    colo_lat = colocated_latencies(spec, dlat)
    if spec.include_colocated:
        units += [u for u in colocated_units(set(colo_lat)) if max_replicas(u, spec.cluster) > 0]
    deps = [unit_deployment(spec, u, colo_lat if u.decode is None else lat, dlat) for u in units]
    joint = run_jobs([_job(spec, d, trace, "joint") for d in deps], spec.jobs, progress, "joint",
                     [u.describe() for u in units])
    scored = [s for s in (_score(spec, u, gp) for u, gp in zip(units, joint)) if s is not None]
    ranked = _confirm(spec, scored, dict(zip(units, deps)), trace, progress)
    best = ranked[0] if ranked else None
    feasible = best is not None and best.unit_goodput > 0 and (
        spec.target_rate is None or best.planned_goodput >= spec.target_rate)
    return SearchResult(ranked, feasible, g, len(phase_jobs) + len(units), time.perf_counter() - started)


def _confirm(spec: SearchSpec, scored: list[Scored], deps: dict[Unit, SimDeployment], trace: Trace,
             progress: Progress | None) -> tuple[Scored, ...]:
    """Re-check the leading `CONFIRM_TOP` units with `CONFIRM_FACTOR` times their trace (up to the
    search's whole trace): one that misses the target there gets the goodput of the long trace
    and the ranking is redone, until the leaders hold. A queue that builds slowly (a colocated
    engine's prefill backlog) passes a short trace and fails a long one."""
    confirmed: set[Unit] = set()
    ranked = sorted(scored, key=lambda s: _rank_key(spec, s))
    while True:
        todo = [s for s in ranked[:CONFIRM_TOP] if s.unit not in confirmed and s.unit_goodput > 0]
        if not todo:
            return tuple(ranked)
        s = todo[0]
        dep = deps[s.unit]
        long = trace.head(CONFIRM_FACTOR * len(job_trace(spec, dep, trace)))
        confirmed.add(s.unit)
        if attained(spec.slo, counted(simulate(dep, long, s.unit_goodput))) >= spec.slo.attainment:
            continue
        g = goodput(dep, long, spec.slo, max_rate=s.unit_goodput, near=0.85)
        if progress:
            progress(len(confirmed), len(confirmed), f"confirm: {s.unit.describe()} → {g:.3f} req/s on {len(long)} requests")
        ranked = sorted([x for x in ranked if x is not s] + [x for x in [_score(spec, s.unit, g)] if x is not None],
                        key=lambda x: _rank_key(spec, x))


def phase_latencies(spec: SearchSpec, source: LatencySource, role: str = "prefill") -> dict[PhaseConfig, InstanceLatency]:
    """Instances of `role` on its nodes' GPU. Memory pruning: configs whose weights, activation
    reserve and one max-length request do not fit are dropped."""
    out = {}
    for c in phase_configs(spec.model, spec.cluster):
        il = instance_latency(source, spec.model, spec.cluster.gpu_for(role), c.tp, c.pp,
                              max_batch_tokens=spec.prefill_token_budget, max_num_seqs=spec.max_num_seqs,
                              max_model_len=spec.max_model_len)
        if il is not None:
            out[c] = il
    return out


def _phase_deployment(spec: SearchSpec, role: str, il: InstanceLatency) -> SimDeployment:
    if role == "prefill":
        return SimDeployment(prefill=(il,), phases="prefill", prefill_token_budget=spec.prefill_token_budget)
    return SimDeployment(prefill=(), decode=(il,), phases="decode", max_num_seqs=spec.max_num_seqs,
                      decode_token_limit=spec.decode_token_limit)


def deployment_of(spec: SearchSpec, unit: Unit) -> SimDeployment:
    """`unit` with its latencies on the GPUs its instances run on; ValueError when one does not fit."""
    dlat = phase_latencies(spec, spec.decode_source or spec.source, "decode")
    lat = colocated_latencies(spec, dlat) if unit.decode is None else phase_latencies(spec, spec.source)
    missing = [f"{c}" for c, have in ((unit.prefill, lat), (unit.decode, dlat)) if c is not None and c not in have]
    if missing:
        raise ValueError(f"{', '.join(missing)} does not fit {spec.cluster.gpu.name} or has no latency data")
    return unit_deployment(spec, unit, lat, dlat)


def colocated_latencies(spec: SearchSpec, dlat: dict[PhaseConfig, InstanceLatency]) -> dict[PhaseConfig, InstanceLatency]:
    """Colocated instances run on the decode nodes, from `colocated_source` if given."""
    return phase_latencies(spec, spec.colocated_source, "decode") if spec.colocated_source else dlat


def unit_deployment(spec: SearchSpec, unit: Unit, lat: dict[PhaseConfig, InstanceLatency],
                    dlat: dict[PhaseConfig, InstanceLatency] | None = None) -> SimDeployment:
    """`lat`: prefill (or colocated) instances; `dlat`: decode instances (default `lat`)."""
    common = dict(prefill_token_budget=spec.prefill_token_budget, max_num_seqs=spec.max_num_seqs,
                  decode_token_limit=spec.decode_token_limit)
    if unit.decode is None:
        return SimDeployment(mode="colocated", prefill=(lat[unit.prefill],), colocated_policy=unit.colocated_policy,
                          **common)
    return SimDeployment(prefill=(lat[unit.prefill],) * unit.num_prefill, decode=((dlat or lat)[unit.decode],) * unit.num_decode,
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


def _estimate(spec: SearchSpec, u: Unit, g: dict[tuple[str, PhaseConfig], float]) -> float:
    """A unit's goodput from its phases' (req/s): the slower phase, or the KV links."""
    assert u.decode is not None
    link = 1.0 / transfer_model(spec.model, spec.cluster, u, spec.codec).transfer_s(int(spec.workload.mean_prompt_len))
    return min(u.num_prefill * g.get(("prefill", u.prefill), 0.0), u.num_decode * g.get(("decode", u.decode), 0.0),
               0.9 * u.num_decode * link)  # each decode instance pulls over its own link, FIFO


def _top(spec: SearchSpec, units: Sequence[Unit], g: dict[tuple[str, PhaseConfig], float]) -> list[Unit]:
    """The `verify_top_k` best units by estimate. Without a target rate, units are scored in the
    order of an optimistic key (as many replicas as the GPU count allows) and packing is checked
    only until no later unit can reach the top k (a 1,024-GPU cluster has ~20k units)."""
    k = spec.verify_top_k
    est = [(u, v) for u, v in ((u, _estimate(spec, u, g)) for u in units) if v > 0]
    if spec.target_rate is not None:
        scored = [s for s in (_score(spec, u, v) for u, v in est) if s is not None]
        return [s.unit for s in sorted(scored, key=lambda s: _rank_key(spec, s))[:k]]
    optimistic = sorted((Scored(u, v, spec.cluster.num_gpus // u.num_gpus) for u, v in est),
                        key=lambda s: _rank_key(spec, s))
    exact: list[Scored] = []
    for s in optimistic:
        if len(exact) >= k and _rank_key(spec, s)[0] > _rank_key(spec, exact[k - 1])[0]:
            break
        real = _score(spec, s.unit, s.unit_goodput)
        if real is not None:
            exact.append(real)
            exact.sort(key=lambda x: _rank_key(spec, x))
    return [s.unit for s in exact[:k]]


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


Job = tuple[SimDeployment, Trace, SLOConfig, Metric, float]


def search_trace(spec: SearchSpec) -> Trace:
    """The search's one seeded trace; every simulation runs a prefix of it (`job_trace`)."""
    return spec.workload.trace(max(spec.num_requests, MAX_REQUESTS), spec.seed)


def job_trace(spec: SearchSpec, dep: SimDeployment, trace: Trace) -> Trace:
    """As much of the search's trace as `dep` needs for steady state."""
    return trace.head(steady_len(dep, trace, spec.num_requests))


def _job(spec: SearchSpec, dep: SimDeployment, trace: Trace, metric: Metric) -> Job:
    trace = job_trace(spec, dep, trace)
    c = spec.cluster
    return dep, trace, spec.slo, metric, hardware_bound(dep, trace, spec.model, c.gpu, c.gpu_for("decode"))


def _goodput_job(job: Job) -> float:
    dep, trace, slo, metric, bound = job
    return goodput(dep, trace, slo, metric, max_rate=bound)


def run_jobs(jobs: list[Job], n_jobs: int, progress: Progress | None,
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

