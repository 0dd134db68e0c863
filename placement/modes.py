"""Choosing the serving mode for a multi-turn workload: colocated with prefix caching,
disaggregated with and without reuse, and conditional disaggregation at a threshold.

`compare_modes` simulates each system on the search's one session trace (closed loop, sim_reuse.py)
and measures its goodput (goodput.py's bisection, joint TTFT+TPOT attainment):

  a  disaggregated, no reuse           (today's deployment; the baseline of the gain)
  b  colocated chunked + prefix cache  (cache-aware dispatch over `colocated_instances` engines)
  c  colocated prefill-priority + prefix cache
  d  disaggregated + reuse             (prefix caches both sides, delta pulls, cache-aware routing)
  e  conditional disaggregation        (d + the router's PDRule at each candidate threshold)

a, d and e at every prefill:decode ratio of `ratios`; e at every threshold of `thresholds`
(uncached prompt tokens; 0 is d). Every instance is the smallest pp = 1 configuration both pools
can run (the per-GPU comparison the issue's headline makes; the TP dimension is `pdserve plan`'s
general search, which has no sessions). Ranked by goodput per GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pdserve.placement.candidates import PhaseConfig, Unit
from pdserve.placement.search import Progress, SearchSpec, _run, colocated_latencies, job_trace, phase_latencies, \
    unit_deployment
from pdserve.placement.sessions import SessionTrace, as_sessions
from pdserve.placement.sim_deployment import CHUNK_SIZE, SimDeployment
from pdserve.placement.simulator import simulation
from pdserve.placement.workload import Trace

THRESHOLDS = (32, 64, 128, 256, 512)
SYSTEMS = {"a": "disaggregated, no reuse", "b": "colocated chunked + prefix caching",
           "c": "colocated prefill-priority + prefix caching", "d": "disaggregated + reuse + cache-aware routing",
           "e": "conditional disaggregation"}


@dataclass(frozen=True)
class ModeResult:
    system: str  # a key of SYSTEMS
    unit: Unit  # the instance configuration; colocated: one engine of `num_instances`
    num_instances: tuple[int, int]  # (prefill, decode); colocated: (engines, 0)
    threshold: int | None  # e: router.pd_threshold_tokens
    goodput_rps: float  # the whole deployment's
    num_gpus: int
    reuse: dict[str, float] = field(default_factory=dict)  # counters at the goodput rate (ReuseStats)

    @property
    def per_gpu_goodput(self) -> float:
        return self.goodput_rps / self.num_gpus

    def describe(self) -> str:
        p, d = self.num_instances
        shape = f"{p}× colocated {self.unit.prefill}" if d == 0 else f"{p}P+{d}D {self.unit.prefill}"
        return shape + (f", threshold {self.threshold}" if self.threshold is not None else "")


@dataclass(frozen=True)
class ModeComparison:
    results: tuple[ModeResult, ...]  # every candidate simulated

    def best(self, system: str) -> ModeResult | None:
        """The highest per-GPU goodput among `system`'s candidates (ties: the first simulated)."""
        cands = [r for r in self.results if r.system == system]
        return max(cands, key=lambda r: r.per_gpu_goodput) if cands else None

    def ranking(self) -> list[ModeResult]:
        """Each system's best, best first."""
        best = [b for b in (self.best(s) for s in SYSTEMS) if b is not None]
        return sorted(best, key=lambda r: -r.per_gpu_goodput)

    @property
    def winner(self) -> ModeResult:
        return self.ranking()[0]

    def gain(self) -> float:
        """The winner's per-GPU goodput over plain disaggregated serving without reuse (system a)."""
        base = self.best("a")
        return self.winner.per_gpu_goodput / base.per_gpu_goodput if base and base.per_gpu_goodput > 0 else float("inf")


def instance_config(spec: SearchSpec) -> PhaseConfig:
    """The smallest pp = 1 configuration both pools (and colocated engines) can run."""
    lat, dlat = phase_latencies(spec, spec.source), phase_latencies(spec, spec.decode_source or spec.source, "decode")
    common = sorted((c for c in set(lat) & set(dlat) & set(colocated_latencies(spec, dlat)) if c.pp == 1),
                    key=lambda c: (c.num_gpus, c.tp))
    if not common:
        raise ValueError(f"plan: {spec.model.name} fits no pp = 1 instance on {spec.cluster.gpu.name}")
    return common[0]


def default_ratios(spec: SearchSpec, config: PhaseConfig, max_instances: int = 4) -> list[tuple[int, int]]:
    """(prefill, decode) instance counts of at most `max_instances` instances that fit the cluster."""
    room = spec.cluster.num_gpus // config.num_gpus
    return [(p, d) for n in range(2, max_instances + 1) for p in range(1, n) for d in [n - p] if p + d <= room]


def candidates(spec: SearchSpec, config: PhaseConfig, ratios: Sequence[tuple[int, int]],
               thresholds: Sequence[int], colocated_instances: int,
               chunk_size: int = CHUNK_SIZE) -> list[tuple[ModeResult, SimDeployment]]:
    """Every system's deployments (goodput still 0); `chunk_size`: prompt tokens per chunked
    iteration, of (b)'s chunks and (e)'s local prefills."""
    lat = phase_latencies(spec, spec.source)
    dlat = phase_latencies(spec, spec.decode_source or spec.source, "decode")
    out: list[tuple[ModeResult, SimDeployment]] = []
    for policy, system in (("chunked", "b"), ("prefill_priority", "c")):
        unit = Unit(algorithm="colocated", prefill=config, colocated_policy=policy)
        one = unit_deployment(spec, unit, colocated_latencies(spec, dlat), dlat)
        dep = replace(one, prefill=one.prefill * colocated_instances, prefix_caching=True, cache_aware=True,
                      chunk_size=chunk_size)
        out.append((ModeResult(system, unit, (colocated_instances, 0), None, 0.0,
                               config.num_gpus * colocated_instances), dep))
    for p, d in ratios:
        unit = Unit(algorithm="high-affinity", prefill=config, num_prefill=p, decode=config, num_decode=d)
        plain = unit_deployment(spec, unit, lat, dlat)
        reuse = replace(plain, prefix_caching=True, cache_aware=True, chunk_size=chunk_size)
        gpus = unit.num_gpus
        out.append((ModeResult("a", unit, (p, d), None, 0.0, gpus), plain))
        out.append((ModeResult("d", unit, (p, d), None, 0.0, gpus), reuse))
        out += [(ModeResult("e", unit, (p, d), t, 0.0, gpus), replace(reuse, pd_threshold_tokens=t)) for t in thresholds]
    return out


def compare_modes(spec: SearchSpec, thresholds: Sequence[int] = THRESHOLDS,
                  ratios: Sequence[tuple[int, int]] | None = None, colocated_instances: int = 2,
                  chunk_size: int = CHUNK_SIZE, progress: Progress | None = None) -> ModeComparison:
    """Goodput of every system's candidates (see the module doc); the reuse counters of each
    system's best at its goodput rate."""
    config = instance_config(spec)
    ratios = list(ratios) if ratios is not None else default_ratios(spec, config)
    if not ratios:
        raise ValueError(f"plan: {spec.cluster.num_gpus} GPUs hold no prefill + decode pair of {config}")
    cands = candidates(spec, config, ratios, thresholds, colocated_instances, chunk_size)
    trace = spec.workload.trace(spec.num_requests, spec.seed)
    if not isinstance(trace, SessionTrace):  # every system through the same (session) simulations
        trace = as_sessions(trace)
    jobs = [(dep, job_trace(spec, dep, trace), spec.slo, "joint", float("inf")) for _, dep in cands]
    values = _run(jobs, spec.jobs, progress, "mode", [f"{SYSTEMS[m.system]} {m.describe()}" for m, _ in cands])
    results = [replace(m, goodput_rps=v) for (m, _), v in zip(cands, values)]
    comparison = ModeComparison(tuple(results))
    final = [replace(r, reuse=reuse_counters(dep, job[1], r.goodput_rps))
             if r is comparison.best(r.system) and r.goodput_rps > 0 else r
             for (_, dep), job, r in zip(cands, jobs, results)]
    return ModeComparison(tuple(final))


def reuse_counters(dep: SimDeployment, trace: Trace, rate: float) -> dict[str, float]:
    """Prefix-hit rate, KV tokens pulled per request and local-prefill share at `rate`."""
    sim = simulation(dep, trace, rate)
    sim.run()
    st = sim.stats
    n = max(1, st.num_local + st.num_remote)
    return {"prefix_hit_rate": round(st.hit_rate, 4), "pulled_tokens_per_request": round(st.pulled_tokens / len(trace), 1),
            "local_prefill_share": round(st.num_local / n, 4) if st.num_local + st.num_remote else 0.0}
