"""`pdserve simulate CONFIG --rate R...`: a plan file (what `pdserve plan` wrote, replayed with the
hardware, latency source, cluster, workload and engine settings it was planned for) or a serving
config (with the flags' defaults), through the simulator at given rates, with the config's reuse
settings (prefix caching, cache-aware routing, conditional disaggregation: reuse_settings.py)."""

from __future__ import annotations

import argparse
import dataclasses

from pdserve.config import SLOConfig
from pdserve.config import ServingConfig
from pdserve.placement.candidates import PhaseConfig, Unit
from pdserve.placement.goodput import counted
from pdserve.placement.hardware import ClusterSpec, GPUSpec
from pdserve.placement.plan import Plan
from pdserve.placement.profile_file import load_profile
from pdserve.placement.roofline import Roofline
from pdserve.placement.reuse_settings import ReuseSettings
from pdserve.placement.search import SearchSpec, deployment_of, job_trace, search_trace
from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.simulator import simulate


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> None:
    from pdserve.placement.cli import add_inputs

    s = subparsers.add_parser("simulate", help="run a plan or serving config through the simulator at given rates")
    s.add_argument("config", help="plan file (pdserve plan's *.plan.yaml: replays what was planned) or serving config")
    add_inputs(s, defaults=False)
    s.add_argument("--rate", "--rates", dest="rates", nargs="+", required=True,
                   help="request rates, req/s (space- or comma-separated)")
    s.set_defaults(func=run_simulate)


def _fill_from_plan(args: argparse.Namespace, plan: Plan | None) -> None:
    """Flags left out take the plan's recorded values, then the plan command's defaults."""
    from pdserve.placement.cli import DEFAULTS

    pf = plan.planned_for if plan else {}
    recorded = {**pf.get("cluster", {}), **pf.get("workload", {}), **pf.get("engine", {})}
    wl = pf.get("workload", {})
    recorded["workload"] = wl.get("source") or wl.get("name")  # a lengths file by its path
    recorded["nodes"], recorded["gpus_per_node"] = recorded.get("num_nodes"), recorded.get("gpus_per_node")
    for name in ("nodes", "prefill_nodes", "gpus_per_node", "inter_node_gbps", "workload", "num_requests", "seed",
                 "prefill_token_budget", "max_num_seqs", "decode_token_limit", "tokenizer"):
        if getattr(args, name, None) is None:
            setattr(args, name, recorded.get(name) if recorded.get(name) is not None else DEFAULTS.get(name))


def _planned_spec(args: argparse.Namespace, plan: Plan, slo: SLOConfig) -> SearchSpec | None:
    """The plan's own hardware and latency source when no flag overrides them."""
    from pdserve.placement.cli import search_spec

    pf = plan.planned_for
    if not pf or args.gpu or args.profile or args.cluster:
        return None
    spec, _ = search_spec(argparse.Namespace(**{**vars(args), "gpu": "a100-80g"}), args.model or pf["model"], slo,
                          codec=plan.codec)
    gpu = GPUSpec(**pf["hardware"])
    decode_gpu = GPUSpec(**pf["decode_hardware"]) if pf.get("decode_hardware") else None
    c = pf["cluster"]
    intra = args.intra_node_gbps / 8 if args.intra_node_gbps else c.get("intra_node_gbps")
    cluster = ClusterSpec(num_nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=gpu, decode_gpu=decode_gpu,
                          inter_node_gbps=args.inter_node_gbps, intra_node_gbps=intra, prefill_nodes=c.get("prefill_nodes"))
    source = Roofline(gpu=gpu) if pf["source"].startswith("roofline-") else load_profile(pf["source"])
    return dataclasses.replace(spec, cluster=cluster, source=source,
                               decode_source=Roofline(gpu=decode_gpu) if decode_gpu else None)


def serving_unit(cfg: ServingConfig, cluster: ClusterSpec) -> Unit:
    """The serving config as one unit replicated once (the simulator runs it whole)."""
    if cfg.mode == "colocated":
        pool = cfg.decode
        return Unit(algorithm="colocated", prefill=PhaseConfig(pool.tp, pool.pp), colocated_policy=cfg.colocated_policy)
    p, d = cfg.prefill, cfg.decode
    return Unit(algorithm="high-affinity", prefill=PhaseConfig(p.tp, p.pp), num_prefill=p.instances,
                decode=PhaseConfig(d.tp, d.pp), num_decode=d.instances,
                intra_node_transfer=p.gpus_per_instance + d.gpus_per_instance <= cluster.gpus_per_node
                and cluster.prefill_nodes is None)


def serving_deployment(spec: SearchSpec, cfg: ServingConfig) -> SimDeployment:
    """What `cfg` deploys, as the simulator runs it: its pools (colocated: its engines), and its
    reuse settings (prefix caches, cache-aware routing, conditional disaggregation and the step
    budget of chunked engines) through `ReuseSettings`, the mapping the mode search writes with."""
    dep = deployment_of(spec, serving_unit(cfg, spec.cluster))
    if cfg.mode == "colocated" and cfg.decode.instances > 1:
        dep = dataclasses.replace(dep, prefill=dep.prefill * cfg.decode.instances)
    return ReuseSettings.of_serving(cfg).apply(dep)


def reuse_line(dep: SimDeployment) -> str:
    if not dep.models_reuse:
        return "no prefix reuse"
    out = "prefix caching" if dep.prefix_caching else "no prefix caching"
    out += ", cache-aware routing" if dep.cache_aware else ""
    if dep.pd_threshold_tokens or dep.pd_prefill_queue_limit is not None:
        out += (f", conditional disaggregation (threshold {dep.pd_threshold_tokens}, prefill queue limit "
                f"{dep.pd_prefill_queue_limit}, local chunks of {dep.chunk_size} tokens)")
    return out


def run_simulate(args: argparse.Namespace) -> int:
    from pdserve.placement.cli import load_serving, search_spec

    cfg, plan = load_serving(args.config)
    _fill_from_plan(args, plan)
    slo = cfg.slo
    codec = plan.codec if plan else (cfg.kvtransfer.codec if cfg.kvtransfer.codec != "auto" else "raw")
    spec = (_planned_spec(args, plan, slo) if plan else None) or search_spec(
        args, args.model or (plan.planned_for.get("model") if plan else None) or cfg.model, slo, codec=codec)[0]
    unit = serving_unit(cfg, spec.cluster)
    dep = serving_deployment(spec, cfg)
    trace = job_trace(spec, dep, search_trace(spec))  # the plan's requests, enough to fill every decode batch
    c = spec.cluster
    print(f"{unit.describe()} on {dep.num_gpus} {c.gpu.name} ({spec.source.name}), workload {spec.workload.name}, "
          f"{len(trace)} requests; SLO TTFT {cfg.slo.ttft_s}s TPOT {cfg.slo.tpot_s}s; {reuse_line(dep)}")
    print(f"{'rate':>7} {'joint':>7} {'ttft ok':>7} {'tpot ok':>7} {'ttft p50':>9} {'p90':>8} {'p99':>8} "
          f"{'tpot p50':>9} {'p90':>8} {'p99':>8}")
    for rate in (float(r) for arg in args.rates for r in arg.split(",") if r):
        res = counted(simulate(dep, trace, rate))  # as goodput counts: without the warm-up
        q = res.percentiles()
        print(f"{rate:>7.3f} {res.attainment(cfg.slo.ttft_s, cfg.slo.tpot_s):>7.1%} {res.ttft_attainment(cfg.slo.ttft_s):>7.1%} "
              f"{res.tpot_attainment(cfg.slo.tpot_s):>7.1%} {q['ttft_p50']:>9.3f} {q['ttft_p90']:>8.3f} {q['ttft_p99']:>8.3f} "
              f"{q['tpot_p50']:>9.4f} {q['tpot_p90']:>8.4f} {q['tpot_p99']:>8.4f}")
    return 0
