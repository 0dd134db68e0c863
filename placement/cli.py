"""`pdserve plan | simulate | profile`: argument parsing and printing around the placement pipeline."""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

from pdserve.bench.metrics import SLO
from pdserve.config import ServingConfig
from pdserve.placement.candidates import PhaseConfig, Unit
from pdserve.placement.hardware import ClusterSpec, load_gpu
from pdserve.placement.latency import LatencySource, PhaseProfile
from pdserve.placement.model_spec import ModelSpec, load_model
from pdserve.placement.plan import Plan
from pdserve.placement.profile_file import PUBLISHED, load_profile
from pdserve.placement.roofline import Roofline
from pdserve.placement.search import SearchResult, SearchSpec, phase_latencies, search, unit_deployment
from pdserve.placement.simulator import simulate
from pdserve.placement.workload import load_workload


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="search the placement that maximises per-GPU goodput under SLOs")
    _common(p)
    p.add_argument("--ttft", type=float, required=True, help="TTFT SLO, seconds")
    p.add_argument("--tpot", type=float, required=True, help="TPOT SLO, seconds")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--rate", type=float, default=None, help="target req/s: plan the fewest GPUs that reach it")
    p.add_argument("--affinity", choices=("high", "low", "both"), default="both",
                   help="DistServe Algorithm 1 (high), 2 (low) or both")
    p.add_argument("--no-colocated", action="store_true", help="do not consider colocated serving")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="simulation processes")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    p.add_argument("-o", "--output", default="serving.yaml", help="the winning serving config (pdserve serve)")
    p.add_argument("--plan-output", default=None, help="also write the full plan (with GPU placement)")
    p.set_defaults(func=run_plan)

    s = subparsers.add_parser("simulate", help="run a serving config through the simulator at given rates")
    s.add_argument("config", help="serving config YAML (as `pdserve plan` writes)")
    _common(s)
    s.add_argument("--rate", "--rates", dest="rates", nargs="+", required=True,
                   help="request rates, req/s (space- or comma-separated)")
    s.set_defaults(func=run_simulate)

    f = subparsers.add_parser("profile", help="measure the engine on this machine and fit a latency profile")
    f.add_argument("--model", default="smollm2-135m")
    f.add_argument("-o", "--output", default="profile.json")
    f.add_argument("--max-batch-tokens", type=int, default=2048, help="largest batch measured, in tokens")
    f.add_argument("--max-len", type=int, default=1024)
    f.add_argument("--max-decode-tokens", type=int, default=16384, help="largest decode batch measured, in context tokens")
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--from-steps", nargs="+", default=None, metavar="STEPS_JSONL",
                   help="fit an in-situ profile to the steps a serving deployment ran (step logs, as "
                        "benchmarks/headline.py saves them) instead of measuring the engine alone")
    f.add_argument("--decode-shape", default=None, metavar="PROFILE",
                   help="with --from-steps: a profile measured over a grid (pdserve profile) whose decode curve, "
                        "scaled, continues the in-situ one past the largest batch the steps ran")
    f.set_defaults(func=run_profile)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="catalog name (opt-13b, llama-3-8b, ...) or an HF config.json")
    p.add_argument("--gpu", default="a100-80g", help="GPU name (a100-80g, h100, h200, l4) or a YAML spec")
    p.add_argument("--profile", default=None,
                   help=f"latency profile file or published name ({', '.join(PUBLISHED)}); default: roofline of --gpu")
    p.add_argument("--colocated-profile", default=None, help="profile for colocated candidates (default: --profile)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--inter-node-gbps", type=float, default=100.0, help="network between nodes, Gbit/s")
    p.add_argument("--intra-node-gbps", type=float, default=None, help="GB/s between GPUs of a node (default: GPU spec)")
    p.add_argument("--workload", default="sharegpt-like", help="'sharegpt-like' or a lengths file (JSONL/JSON/CSV)")
    p.add_argument("--codec", default="raw", help="KV codec on the wire: raw, int8, fp8, int4, int4_zstd")
    p.add_argument("--num-requests", type=int, default=1000, help="requests per simulation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-token-budget", type=int, default=4096)
    p.add_argument("--decode-token-limit", type=int, default=None, help="KV tokens a decode instance admits")
    p.add_argument("--max-num-seqs", type=int, default=512)


def _inputs(args: argparse.Namespace, model_name: str) -> tuple[ModelSpec, ClusterSpec, LatencySource, LatencySource | None]:
    model = load_model(model_name)
    gpu = load_gpu(args.gpu)
    cluster = ClusterSpec(num_nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=gpu,
                          inter_node_gbps=args.inter_node_gbps, intra_node_gbps=args.intra_node_gbps)
    source: LatencySource = load_profile(args.profile) if args.profile else Roofline(gpu=gpu)
    colocated = load_profile(args.colocated_profile) if args.colocated_profile else None
    return model, cluster, source, colocated


def run_plan(args: argparse.Namespace) -> int:
    if not args.model:
        raise ValueError("plan: --model is required")
    model, cluster, source, colocated = _inputs(args, args.model)
    spec = SearchSpec(model=model, cluster=cluster, source=source, colocated_source=colocated,
                      workload=load_workload(args.workload), slo=SLO(ttft_s=args.ttft, tpot_s=args.tpot,
                      attainment=args.attainment), target_rate=args.rate, codec=args.codec, affinity=args.affinity,
                      include_colocated=not args.no_colocated, num_requests=args.num_requests, seed=args.seed,
                      prefill_token_budget=args.prefill_token_budget, max_num_seqs=args.max_num_seqs,
                      decode_token_limit=args.decode_token_limit, jobs=args.jobs)
    print(f"planning {model.name} on {cluster.num_nodes}×{cluster.gpus_per_node} {cluster.gpu.name} "
          f"({source.name}), SLO TTFT {args.ttft}s TPOT {args.tpot}s @ {args.attainment:.0%}", file=sys.stderr)
    result = search(spec, progress=lambda i, n, msg: print(f"  [{i}/{n}] {msg}", file=sys.stderr))
    print(format_table(result, args.top))
    best = result.best
    if best is None:
        print("no configuration fits this cluster (the weights do not fit, or the source has no data)")
        return 1
    if not result.feasible:
        print("no configuration meets the SLOs" + (f" at {args.rate} req/s" if args.rate else "")
              + f"; closest: {best.unit.describe()} ({best.planned_goodput:.3f} req/s)")
    plan = Plan.from_scored(best, model=model.name, cluster=cluster, codec=args.codec, ttft_s=args.ttft,
                            tpot_s=args.tpot, attainment=args.attainment)
    Path(args.output).write_text(plan.serving_config().to_yaml())
    if args.plan_output:
        Path(args.plan_output).write_text(plan.to_yaml())
    print(f"searched {result.num_simulated} candidates in {result.elapsed_s:.1f}s; "
          f"wrote {args.output}" + (f" and {args.plan_output}" if args.plan_output else ""))
    _print_mode_gap(result)
    return 0 if result.feasible else 1


def format_table(result: SearchResult, top: int) -> str:
    rows = [f"{'#':>2}  {'algorithm':<14} {'unit':<34} {'GPUs':>4} {'×':>3} {'goodput':>9} {'/GPU':>7}"]
    for i, s in enumerate(result.ranked[:top], 1):
        rows.append(f"{i:>2}  {s.unit.algorithm:<14} {s.unit.describe():<34} {s.unit.num_gpus:>4} {s.replicas:>3} "
                    f"{s.planned_goodput:>9.3f} {s.per_gpu_goodput:>7.3f}")
    return "\n".join(rows)


def _print_mode_gap(result: SearchResult) -> None:
    best_d = next((s for s in result.ranked if s.unit.mode == "disaggregated"), None)
    best_c = next((s for s in result.ranked if s.unit.mode == "colocated"), None)
    if best_d and best_c and best_c.planned_goodput > 0:
        winner = "disaggregated" if result.ranked[0].unit.mode == "disaggregated" else "colocated"
        ratio = best_d.planned_goodput / best_c.planned_goodput
        print(f"{winner} wins: disaggregated/colocated planned goodput = {ratio:.2f}×")


def serving_unit(cfg: ServingConfig, cluster: ClusterSpec) -> Unit:
    """The serving config as one unit replicated once (the simulator runs it whole)."""
    if cfg.mode == "colocated":
        pool = cfg.decode
        return Unit(algorithm="colocated", prefill=PhaseConfig(pool.tp, pool.pp), colocated_policy=cfg.colocated_policy)
    p, d = cfg.prefill, cfg.decode
    return Unit(algorithm="high-affinity", prefill=PhaseConfig(p.tp, p.pp), num_prefill=p.instances,
                decode=PhaseConfig(d.tp, d.pp), num_decode=d.instances,
                intra_node_transfer=p.gpus_per_instance + d.gpus_per_instance <= cluster.gpus_per_node)


def run_simulate(args: argparse.Namespace) -> int:
    cfg = ServingConfig.load(args.config)
    model, cluster, source, colocated = _inputs(args, args.model or cfg.model)
    spec = SearchSpec(model=model, cluster=cluster, source=source, colocated_source=colocated,
                      workload=load_workload(args.workload), slo=SLO(ttft_s=cfg.slo.ttft_s, tpot_s=cfg.slo.tpot_s,
                      attainment=cfg.slo.attainment), codec=cfg.kvtransfer.codec if cfg.kvtransfer.codec != "auto" else "raw",
                      num_requests=args.num_requests, seed=args.seed, prefill_token_budget=args.prefill_token_budget,
                      max_num_seqs=args.max_num_seqs, decode_token_limit=args.decode_token_limit)
    unit = serving_unit(cfg, cluster)
    lat = phase_latencies(spec, colocated if (colocated and unit.decode is None) else source)
    missing = [c for c in (unit.prefill, unit.decode) if c is not None and c not in lat]
    if missing:
        raise ValueError(f"simulate: {', '.join(map(str, missing))} does not fit {cluster.gpu.name} or has no latency data")
    dep = unit_deployment(spec, unit, lat)
    if cfg.mode == "colocated" and cfg.decode.instances > 1:
        dep = type(dep)(**{**dep.__dict__, "prefill": dep.prefill * cfg.decode.instances})
    trace = spec.workload.trace(spec.num_requests, spec.seed)
    print(f"{unit.describe()} on {dep.num_gpus} GPUs; SLO TTFT {cfg.slo.ttft_s}s TPOT {cfg.slo.tpot_s}s")
    print(f"{'rate':>7} {'joint':>7} {'ttft ok':>7} {'tpot ok':>7} {'ttft p50':>9} {'p90':>8} {'p99':>8} "
          f"{'tpot p50':>9} {'p90':>8} {'p99':>8}")
    for rate in (float(r) for arg in args.rates for r in arg.split(",") if r):
        res = simulate(dep, trace, rate)
        q = res.percentiles()
        print(f"{rate:>7.3f} {res.attainment(cfg.slo.ttft_s, cfg.slo.tpot_s):>7.1%} {res.ttft_attainment(cfg.slo.ttft_s):>7.1%} "
              f"{res.tpot_attainment(cfg.slo.tpot_s):>7.1%} {q['ttft_p50']:>9.3f} {q['ttft_p90']:>8.3f} {q['ttft_p99']:>8.3f} "
              f"{q['tpot_p50']:>9.4f} {q['tpot_p90']:>8.4f} {q['tpot_p99']:>8.4f}")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    from pdserve.placement.profile import Grid, fit_and_write, measure_engine

    if args.from_steps:
        return _profile_from_steps(args)
    grid = Grid(max_batch_tokens=args.max_batch_tokens, max_len=args.max_len, max_decode_tokens=args.max_decode_tokens)
    print(f"profiling {args.model} over {len(grid.points())} prefill and {len(grid.decode_points())} decode points",
          file=sys.stderr)
    pre, dec = measure_engine(args.model, grid, args.repeats,
                              progress=lambda i, n: print(f"  [{i}/{n}]", file=sys.stderr))
    key = _profile_key(args.model)
    _, report = fit_and_write(args.output, key, 1, pre, dec)
    return _report_profile(args.output, key, report)


def _profile_from_steps(args: argparse.Namespace) -> int:
    from pdserve.placement.fit import extend_decode, fit_steps
    from pdserve.placement.profile import read_step_log, write_profile

    steps = [s for path in args.from_steps for log in read_step_log(path).values() for s in log]
    kinds = collections.Counter(s.kind for s in steps)
    print(f"{len(steps)} steps: {kinds['prefill']} prefill, {kinds['decode']} decode, {kinds['mixed']} mixed",
          file=sys.stderr)
    profile, report = fit_steps(steps)
    key = _profile_key(args.model)
    if args.decode_shape:
        profile = extend_decode(profile, _tp1_profile(args.decode_shape, key))
    write_profile(args.output, key, 1, profile)
    return _report_profile(args.output, key, report)


def _tp1_profile(path: str, key: str) -> PhaseProfile:
    table = load_profile(path).table
    if 1 not in table.get(key, {}):
        raise ValueError(f"--decode-shape {path}: no tp=1 entry for {key!r} (models: {', '.join(table)})")
    return table[key][1]


def _profile_key(model: str) -> str:
    try:
        return load_model(model).hf_name or model
    except ValueError:
        return model


def _report_profile(output: str, key: str, report: dict) -> int:
    for name, r in report.items():
        print(f"{name}: max rel error {r.max_rel_error:.1%}, mean {r.mean_rel_error:.1%}")
    print(f"wrote {output} ({key}, tp=1)")
    return 0
