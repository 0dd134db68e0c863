"""Planner at scale (issue 18): `pdserve plan` wall and CPU time for Llama-3-70B on 4, 16 and 128
nodes × 8 H100 (32, 128, 1,024 GPUs), and simulator speed per mode in simulated requests per
CPU-second at each deployment's own goodput (Llama-3-8B, H100 roofline, 20,000 ShareGPT-like requests).

  python benchmarks/planner_scale.py [--nodes 4 16 128] [--requests 20000] [--skip-plan]
  python benchmarks/planner_scale.py --sessions results/planner-multiturn-a100/sessions-a100.jsonl
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import time

from pdserve.config import SLOConfig
from pdserve.placement.candidates import PhaseConfig, Unit
from pdserve.placement.goodput import goodput
from pdserve.placement.hardware import ClusterSpec, load_gpu
from pdserve.placement.model_spec import load_model
from pdserve.placement.roofline import Roofline
from pdserve.placement.search import SearchSpec, _phase_deployment, phase_latencies, unit_deployment
from pdserve.placement.simulator import simulate
from pdserve.placement.workload import sharegpt_like


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def plan_time(nodes: int, jobs: int) -> None:
    cmd = ["pdserve", "plan", "--model", "llama-3-70b", "--gpu", "h100", "--nodes", str(nodes), "--gpus-per-node", "8",
           "--ttft", "1s", "--tpot", "100ms", "--jobs", str(jobs), "--top", "1", "-o", f"/tmp/planner-scale-{nodes}.yaml"]
    cpu, t = children_cpu_s(), time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - t, children_cpu_s() - cpu
    best = next((line for line in out.stdout.splitlines() if line.startswith(" 1 ")), "(none)")
    print(f"| {nodes * 8:,} | {jobs} | {wall:.1f} | {cpu:.1f} | {' '.join(best.split()[2:-3])} |")


def sim_speed(n: int) -> None:
    gpu = load_gpu("h100")
    spec = SearchSpec(model=load_model("llama-3-8b"), cluster=ClusterSpec(num_nodes=1, gpus_per_node=8, gpu=gpu),
                      source=Roofline(gpu=gpu), workload=sharegpt_like(), slo=SLOConfig(ttft_s=0.5, tpot_s=0.05))
    lat = phase_latencies(spec, spec.source)
    trace = spec.workload.trace(n, seed=0)
    p, d = PhaseConfig(1, 1), PhaseConfig(2, 1)
    cases = [("disaggregated 2×P TP1 + 1×D TP2", unit_deployment(spec, Unit(algorithm="high-affinity", prefill=p,
                                                                             num_prefill=2, decode=d, num_decode=1), lat), "joint"),
             ("colocated TP1 prefill-priority", unit_deployment(spec, Unit(algorithm="colocated", prefill=p), lat), "joint"),
             ("colocated TP1 chunked", unit_deployment(spec, Unit(algorithm="colocated", prefill=p,
                                                                   colocated_policy="chunked"), lat), "joint"),
             ("prefill alone TP1", _phase_deployment(spec, "prefill", lat[p]), "ttft"),
             ("decode alone TP2", _phase_deployment(spec, "decode", lat[d]), "tpot")]
    print("| case | rate (req/s) | simulated req/s per CPU-second | per wall-second |\n|---|---|---|---|")
    for name, dep, metric in cases:
        rate = goodput(dep, trace.head(4000), spec.slo, metric)
        w, c = time.perf_counter(), time.process_time()
        simulate(dep, trace, rate)
        w, c = time.perf_counter() - w, time.process_time() - c
        print(f"| {name} | {rate:.1f} | {n / c:,.0f} | {n / w:,.0f} |")


def session_speed(path: str, n: int) -> None:
    """The multi-turn simulation (sim_reuse.py) on a session lengths file: OPT-13B, DistServe's A100
    profile, 1 prefill + 3 decode instances, systems (a), (d) and (e) of placement/modes.py."""
    from dataclasses import replace

    from pdserve.placement.profile_file import load_profile
    from pdserve.placement.search import deployment_of
    from pdserve.placement.workload import load_lengths

    gpu = load_gpu("a100-80g")
    spec = SearchSpec(model=load_model("opt-13b"), cluster=ClusterSpec(num_nodes=1, gpus_per_node=4, gpu=gpu),
                      source=load_profile("distserve-a100"), workload=load_lengths(path), slo=SLOConfig(ttft_s=1.0, tpot_s=0.1))
    dep = deployment_of(spec, Unit(algorithm="high-affinity", prefill=PhaseConfig(1, 1), decode=PhaseConfig(1, 1),
                                   num_decode=3))
    trace = spec.workload.trace(n, seed=0)
    reuse = replace(dep, prefix_caching=True, cache_aware=True)
    print("| system | rate (req/s) | simulated req/s per CPU-second |\n|---|---|---|")
    for name, d, rate in (("(a) no reuse", dep, 1.0), ("(d) reuse", reuse, 17.0),
                          ("(e) conditional, threshold 128", replace(reuse, pd_threshold_tokens=128), 17.0)):
        c = time.process_time()
        simulate(d, trace, rate)
        print(f"| {name} | {rate} | {n / (time.process_time() - c):,.0f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 16, 128])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--skip-plan", action="store_true")
    ap.add_argument("--sessions", default=None, metavar="LENGTHS_FILE",
                    help="instead: the multi-turn simulation's speed on this session lengths file")
    a = ap.parse_args()
    if a.sessions:
        session_speed(a.sessions, a.requests)
        raise SystemExit(0)
    sim_speed(a.requests)
    if not a.skip_plan:
        print("\n| GPUs | --jobs | wall s | CPU s (all processes) | winner |\n|---|---|---|---|---|")
        for nodes in a.nodes:
            for jobs in (1, 2):
                plan_time(nodes, jobs)
