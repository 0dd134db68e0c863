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
(uncached prompt tokens; 0 is d), for every (tp, pp) instance both pools can run, the same
configuration on both sides of a pair (`instance_configs`; pp > 1 only for a and d: colocated
engines and local prefills need pp = 1). Not searched here, unlike `pdserve plan`'s single-turn
search: different prefill and decode configurations in one unit, Algorithm 2's cross-node stage
pairing, and more than `max_instances` (4) instances a unit. Ranked by goodput per GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pdserve.placement.candidates import PhaseConfig, Unit
from pdserve.placement.reuse_settings import ReuseSettings
from pdserve.placement.search import Progress, SearchSpec, colocated_latencies, job_trace, phase_latencies, run_jobs, \
    search_trace, unit_deployment
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
    settings: ReuseSettings = field(default_factory=ReuseSettings)  # what the written config must serve

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


def instance_configs(spec: SearchSpec) -> list[PhaseConfig]:
    """Every (tp, pp) both pools can run (the normal search's `phase_configs`, pruned by memory and
    latency data), smallest first. Colocated engines and conditional decode instances need pp = 1."""
    lat, dlat = phase_latencies(spec, spec.source), phase_latencies(spec, spec.decode_source or spec.source, "decode")
    common = sorted(set(lat) & set(dlat), key=lambda c: (c.num_gpus, c.tp))
    if not common:
        raise ValueError(f"plan: {spec.model.name} fits no instance on {spec.cluster.gpu.name}")
    return common


def default_ratios(spec: SearchSpec, config: PhaseConfig, max_instances: int = 4) -> list[tuple[int, int]]:
    """(prefill, decode) instance counts of at most `max_instances` instances that fit the cluster."""
    room = spec.cluster.num_gpus // config.num_gpus
    return [(p, d) for n in range(2, max_instances + 1) for p in range(1, n) for d in [n - p] if p + d <= room]


def candidates(spec: SearchSpec, config: PhaseConfig, ratios: Sequence[tuple[int, int]],
               thresholds: Sequence[int], colocated_instances: int,
               chunk_size: int = CHUNK_SIZE) -> list[tuple[ModeResult, SimDeployment]]:
    """Every system's deployments of `config` instances (goodput still 0); `chunk_size`: prompt
    tokens per chunked iteration, of (b)'s chunks and (e)'s local prefills. pp > 1: (a) and (d)
    only; colocated: when `colocated_instances` engines fit the cluster."""
    lat = phase_latencies(spec, spec.source)
    dlat = phase_latencies(spec, spec.decode_source or spec.source, "decode")
    reuse = ReuseSettings(prefix_caching=True, cache_aware=True)
    out: list[tuple[ModeResult, SimDeployment]] = []
    coloc = config.pp == 1 and config in colocated_latencies(spec, dlat) \
        and config.num_gpus * colocated_instances <= spec.cluster.num_gpus
    for policy, system, s in (("chunked", "b", replace(reuse, chunk_size=chunk_size)), ("prefill_priority", "c", reuse)):
        if not coloc:
            break
        unit = Unit(algorithm="colocated", prefill=config, colocated_policy=policy)
        one = unit_deployment(spec, unit, colocated_latencies(spec, dlat), dlat)
        dep = s.apply(replace(one, prefill=one.prefill * colocated_instances))
        out.append((ModeResult(system, unit, (colocated_instances, 0), None, 0.0,
                               config.num_gpus * colocated_instances, settings=s), dep))
    intra = 2 * config.num_gpus <= spec.cluster.gpus_per_node and spec.cluster.prefill_nodes is None  # a pair's link
    for p, d in ratios:
        unit = Unit(algorithm="high-affinity", prefill=config, num_prefill=p, decode=config, num_decode=d,
                    intra_node_transfer=intra)
        plain = unit_deployment(spec, unit, lat, dlat)
        gpus = unit.num_gpus
        systems = [("a", None, ReuseSettings()), ("d", None, reuse)]
        systems += [("e", t, replace(reuse, pd_threshold_tokens=t, chunk_size=chunk_size)) for t in thresholds
                    if config.pp == 1]
        out += [(ModeResult(system, unit, (p, d), t, 0.0, gpus, settings=s), s.apply(plain)) for system, t, s in systems]
    return out


def compare_modes(spec: SearchSpec, thresholds: Sequence[int] = THRESHOLDS,
                  ratios: Sequence[tuple[int, int]] | None = None, colocated_instances: int = 2,
                  chunk_size: int = CHUNK_SIZE, progress: Progress | None = None) -> ModeComparison:
    """Goodput of every system's candidates (see the module doc); the reuse counters of each
    system's best at its goodput rate."""
    cands = []
    for config in instance_configs(spec):
        fit = [(p, d) for p, d in ratios if (p + d) * config.num_gpus <= spec.cluster.num_gpus] \
            if ratios is not None else default_ratios(spec, config)
        cands += candidates(spec, config, fit, thresholds, colocated_instances, chunk_size)
    if not any(m.system == "a" for m, _ in cands):
        raise ValueError(f"plan: {spec.cluster.num_gpus} GPUs hold no prefill + decode pair of any instance")
    trace = search_trace(spec)  # as `pdserve simulate` and the single-turn search: each job its steady-state head
    if not isinstance(trace, SessionTrace):  # every system through the same (session) simulations
        trace = as_sessions(trace)
    jobs = [(dep, job_trace(spec, dep, trace), spec.slo, "joint", float("inf")) for _, dep in cands]
    values = run_jobs(jobs, spec.jobs, progress, "mode", [f"{SYSTEMS[m.system]} {m.describe()}" for m, _ in cands])
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
