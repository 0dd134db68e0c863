"""`pdserve plan | simulate`: argument parsing and printing around the placement pipeline
(`pdserve profile` lives in profile_cli.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pdserve.bench.units import duration_arg as duration  # one parser of "500ms"/"1s" for every CLI
from pdserve.config import SLOConfig
from pdserve.config import ServingConfig
from pdserve.placement import modes_cli, profile_cli
from pdserve.placement.candidates import Unit
from pdserve.placement.cluster_file import ClusterFile, load_cluster_file
from pdserve.placement.explain import explain, format_explanation
from pdserve.placement.hardware import ClusterSpec, load_gpu
from pdserve.placement.latency import LatencySource
from pdserve.placement.model_spec import load_model
from pdserve.placement.plan import Plan
from pdserve.placement.profile_file import PUBLISHED, load_profile
from pdserve.placement.roofline import Roofline
from pdserve.placement.search import SearchResult, SearchSpec, search
from pdserve.placement.sessions import SessionWorkload
from pdserve.placement.simulate_cli import add_simulate_parser
from pdserve.placement.workload import DATASET_SAMPLES, FALLBACK_TOKENIZER, load_workload, planning_tokenizer

DEFAULTS = dict(gpu="a100-80g (or the profile's device, or cluster.yaml's instance type)", nodes=1, gpus_per_node=8, inter_node_gbps=100.0, workload="sharegpt-like",
                tokenizer=None, num_requests=1000, seed=0, prefill_token_budget=4096, max_num_seqs=512)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="search the placement that maximises per-GPU goodput under SLOs")
    add_inputs(p, defaults=True)
    p.add_argument("--ttft", type=duration, required=True, help="TTFT SLO, e.g. 1s or 250ms (plain numbers: seconds)")
    p.add_argument("--tpot", type=duration, required=True, help="TPOT SLO, e.g. 100ms (plain numbers: seconds)")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet both SLOs (default: %(default)s)")
    p.add_argument("--rate", type=float, default=None, help="target req/s: plan the fewest GPUs that reach it (default: the most goodput)")
    p.add_argument("--codec", default="raw", choices=("raw", "int8", "fp8", "int4", "int4_zstd"),
                   help="KV codec on links between nodes (default: %(default)s)")
    p.add_argument("--affinity", choices=("high", "low", "both"), default="both",
                   help="DistServe Algorithm 1 (high), 2 (low) or both (default: %(default)s)")
    p.add_argument("--no-colocated", action="store_true", help="do not consider colocated serving")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="simulation processes (default: %(default)s)")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table (default: %(default)s)")
    p.add_argument("-o", "--output", default="serving.yaml", help="the winning serving config for pdserve serve (default: %(default)s)")
    p.add_argument("--plan-output", default=None,
                   help="the plan file: placement, what it was planned for, why (default: OUTPUT with .plan.yaml)")
    modes_cli.add_arguments(p)
    p.set_defaults(func=run_plan)
    add_simulate_parser(subparsers)
    profile_cli.add_parser(subparsers)


def add_inputs(p: argparse.ArgumentParser, defaults: bool) -> None:
    """Model, hardware, cluster, workload and engine flags; without `defaults` (simulate) an
    absent flag keeps what the plan file recorded."""
    d = DEFAULTS if defaults else {}

    def default(name: str) -> str:
        return f"default: {DEFAULTS[name]}" if defaults else f"default: the plan's, else {DEFAULTS[name]}"

    p.add_argument("--model", default=None, help="catalog name (opt-13b, llama-3-8b, ...), an HF directory or config.json")
    p.add_argument("--gpu", default=None, help=f"GPU name (a100-80g, h100, h200, l4, cpu) or a YAML spec ({default('gpu')})")
    p.add_argument("--profile", default=None,
                   help=f"latency profile file or published name ({', '.join(PUBLISHED)}) (default: roofline of --gpu)")
    p.add_argument("--colocated-profile", default=None, help="profile for colocated candidates (default: --profile)")
    p.add_argument("--cluster", default=None, metavar="CLUSTER_YAML",
                   help="Ray cluster-launcher YAML: node types, GPUs per node, custom resources (replaces --nodes/--gpus-per-node)")
    p.add_argument("--nodes", type=int, default=d.get("nodes"), help=f"nodes ({default('nodes')})")
    p.add_argument("--prefill-nodes", type=int, default=None,
                   help="the first N nodes hold only prefill, the rest only decode (default: any node holds any)")
    p.add_argument("--decode-gpu", default=None,
                   help="GPU of the decode nodes when it differs from --gpu (needs --prefill-nodes; default: --gpu)")
    p.add_argument("--gpus-per-node", type=int, default=d.get("gpus_per_node"), help=f"GPUs per node ({default('gpus_per_node')})")
    p.add_argument("--inter-node-gbps", type=float, default=d.get("inter_node_gbps"),
                   help=f"network between nodes, Gbit/s ({default('inter_node_gbps')})")
    p.add_argument("--intra-node-gbps", type=float, default=None,
                   help="link between GPUs of a node, Gbit/s (default: the GPU spec's, e.g. NVLink 450 GB/s = 3600)")
    p.add_argument("--workload", default=d.get("workload"),
                   help=f"sharegpt-like (offline), sharegpt | humaneval | longbench (as pdserve bench) or a lengths file ({default('workload')})")
    p.add_argument("--tokenizer", default=d.get("tokenizer"),
                   help="tokenizer for named workloads: HF directory, tokenizer.json or pdserve model (default: the "
                        f"planned model's own when pdserve can load it, else {FALLBACK_TOKENIZER}'s, said in the output)")
    p.add_argument("--num-requests", type=int, default=d.get("num_requests"),
                   help=f"requests per simulation, at least; decode simulations use 4 per batch slot ({default('num_requests')})")
    p.add_argument("--seed", type=int, default=d.get("seed"), help=f"trace seed ({default('seed')})")
    p.add_argument("--prefill-token-budget", type=int, default=d.get("prefill_token_budget"),
                   help=f"prompt tokens per prefill batch ({default('prefill_token_budget')})")
    p.add_argument("--decode-token-limit", type=int, default=None, help="KV tokens a decode instance admits (default: its memory)")
    p.add_argument("--max-num-seqs", type=int, default=d.get("max_num_seqs"),
                   help=f"running requests per decode instance ({default('max_num_seqs')})")


def inputs(args: argparse.Namespace) -> tuple[ClusterSpec, LatencySource, LatencySource | None, ClusterFile | None]:
    """The cluster (from --cluster or --nodes/--gpus-per-node) and latency sources. The device:
    --gpu, else 'cpu' for a profile measured on a CPU, else cluster.yaml's instance type, else A100-80GB."""
    cluster_file = load_cluster_file(args.cluster) if args.cluster else None
    intra = args.intra_node_gbps / 8 if args.intra_node_gbps else None  # Gbit/s → GB/s (GPUSpec's unit)
    gpu = args.gpu or (_profile_gpu(args.profile) if args.profile else None)
    if cluster_file:
        cluster = cluster_file.cluster(gpu, args.inter_node_gbps, intra)
    else:
        cluster = ClusterSpec(num_nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=load_gpu(gpu or "a100-80g"),
                              inter_node_gbps=args.inter_node_gbps, intra_node_gbps=intra, prefill_nodes=args.prefill_nodes,
                              decode_gpu=load_gpu(args.decode_gpu) if args.decode_gpu else None)
    source = load_profile(args.profile) if args.profile else Roofline(gpu=cluster.gpu)
    colocated = load_profile(args.colocated_profile) if args.colocated_profile else None
    return cluster, source, colocated, cluster_file


def decode_source(cluster: ClusterSpec, source: LatencySource) -> LatencySource | None:
    """The decode nodes' latency source when their GPU differs: its roofline (a profile file holds
    one machine's measurements, so a second GPU type plans from rooflines)."""
    if cluster.decode_gpu is None:
        return None
    if not isinstance(source, Roofline):
        raise ValueError("--decode-gpu: plan two GPU types from their rooflines (drop --profile)")
    return Roofline(gpu=cluster.decode_gpu)


def _profile_gpu(profile: str) -> str | None:
    """'cpu' for a profile `pdserve profile` measured on a CPU (its entries say so)."""
    return "cpu" if load_profile(profile).device == "cpu" else None


def search_spec(args: argparse.Namespace, model_name: str, slo: SLOConfig, **kw: object) -> tuple[SearchSpec, ClusterFile | None]:
    model = load_model(model_name)
    cluster, source, colocated, cluster_file = inputs(args)
    tokenizer, note = planning_tokenizer(model_name, args.tokenizer)
    workload = load_workload(args.workload, tokenizer, model.max_model_len)
    if note and args.workload in DATASET_SAMPLES:
        print(f"note: {note}", file=sys.stderr)
    spec = SearchSpec(model=model, cluster=cluster, source=source, colocated_source=colocated,
                      decode_source=decode_source(cluster, source), workload=workload,
                      slo=slo, num_requests=args.num_requests, seed=args.seed,
                      prefill_token_budget=args.prefill_token_budget, max_num_seqs=args.max_num_seqs,
                      decode_token_limit=args.decode_token_limit, **kw)
    return spec, cluster_file


def run_plan(args: argparse.Namespace) -> int:
    if not args.model:
        raise ValueError("plan: --model is required")
    spec, cluster_file = search_spec(
        args, args.model, SLOConfig(ttft_s=args.ttft, tpot_s=args.tpot, attainment=args.attainment),
        target_rate=args.rate, codec=args.codec, affinity=args.affinity,
        include_colocated=not args.no_colocated, jobs=args.jobs)
    if args.compare_modes or isinstance(spec.workload, SessionWorkload):
        return modes_cli.run_modes(args, spec, cluster_file)
    c = spec.cluster
    gpus = c.gpu.name if c.decode_gpu is None else f"{c.gpu.name} (prefill, {c.prefill_nodes} nodes) / {c.decode_gpu.name}"
    print(f"planning {spec.model.name} on {c.num_nodes}×{c.gpus_per_node} {gpus} ({spec.source.name}), "
          f"workload {spec.workload.name}, SLO TTFT {args.ttft:g}s TPOT {args.tpot:g}s @ {args.attainment:.0%}",
          file=sys.stderr)
    result = search(spec, progress=lambda i, n, msg: print(f"  [{i}/{n}] {msg}", file=sys.stderr))
    print(format_table(result, args.top, c))
    best = result.best
    if best is None:
        print("no configuration fits this cluster (the weights do not fit, or the source has no data)")
        return 1
    if not result.feasible:
        print("no configuration meets the SLOs" + (f" at {args.rate} req/s" if args.rate else "")
              + f"; closest: {best.unit.describe()} ({best.planned_goodput:.3f} req/s)")
    why = explain(spec, result)
    print(format_explanation(why))
    plan = Plan.from_scored(best, spec, model_arg=args.model, cluster_file=cluster_file, explain=why,
                            workload_arg=args.workload)
    plan_out = args.plan_output or str(Path(args.output).with_suffix("")) + ".plan.yaml"
    Path(args.output).write_text(plan.serving_config().to_yaml())
    Path(plan_out).write_text(plan.to_yaml())
    print(f"searched {result.num_simulated} candidates in {result.elapsed_s:.1f}s; wrote {args.output} and {plan_out}")
    if plan.model_note:
        print(f"note: {plan.model_note}")
    _print_mode_gap(result)
    return 0 if result.feasible else 1


def format_table(result: SearchResult, top: int, cluster: ClusterSpec) -> str:
    cost = cluster.price_per_hour(1, 1) > 0
    rows = [f"{'#':>2}  {'algorithm':<14} {'unit':<34} {'GPUs':>4} {'×':>3} {'goodput':>9} {'/GPU':>7}"
            + (f" {'$/h':>8} {'req/$':>7}" if cost else "")]
    for i, s in enumerate(result.ranked[:top], 1):
        dollars = unit_price(s.unit, cluster) * s.replicas
        rows.append(f"{i:>2}  {s.unit.algorithm:<14} {s.unit.describe():<34} {s.unit.num_gpus:>4} {s.replicas:>3} "
                    f"{s.planned_goodput:>9.3f} {s.per_gpu_goodput:>7.3f}"
                    + (f" {dollars:>8.1f} {s.planned_goodput * 3600 / dollars:>7.0f}" if cost and dollars else ""))
    if cost:
        rows.append("(goodput in req/s; $/h: the planned GPUs at the catalog's on-demand prices; req/$: requests per dollar)")
    return "\n".join(rows)


def unit_price(unit: Unit, cluster: ClusterSpec) -> float:
    """USD per hour of one unit (colocated instances run on the decode nodes)."""
    if unit.decode is None:
        return cluster.price_per_hour(0, unit.num_gpus)
    return cluster.price_per_hour(unit.prefill.num_gpus * unit.num_prefill, unit.decode.num_gpus * unit.num_decode)


def _print_mode_gap(result: SearchResult) -> None:
    best_d = next((s for s in result.ranked if s.unit.mode == "disaggregated"), None)
    best_c = next((s for s in result.ranked if s.unit.mode == "colocated"), None)
    if best_d and best_c and best_c.planned_goodput > 0:
        winner = "disaggregated" if result.ranked[0].unit.mode == "disaggregated" else "colocated"
        ratio = best_d.planned_goodput / best_c.planned_goodput
        print(f"{winner} wins: disaggregated/colocated planned goodput = {ratio:.2f}×")


def load_serving(path: str) -> tuple[ServingConfig, Plan | None]:
    """A plan file (`plan:` at the top) or a serving config."""
    text = Path(path).read_text()
    if text.lstrip().startswith("plan:"):
        plan = Plan.from_yaml(text)
        return plan.serving_config(), plan
    return ServingConfig.load(path), None
