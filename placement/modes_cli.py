"""`pdserve plan` for multi-turn workloads (a lengths file with sessions or shared prefixes, or
`--compare-modes`): the predicted ranking of the serving modes (modes.py), and the winner's
serving config with its reuse settings (engine.enable_prefix_caching, router cache-aware
policies, router.pd_threshold_tokens)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from pdserve.placement.cluster_file import ClusterFile
from pdserve.placement.deploy import kv_pool_gb
from pdserve.placement.modes import SYSTEMS, THRESHOLDS, ModeComparison, ModeResult, compare_modes
from pdserve.placement.packing import max_replicas
from pdserve.placement.plan import Plan
from pdserve.placement.search import Scored, SearchSpec
from pdserve.placement.sim_deployment import CHUNK_SIZE


SEARCHED = ("searched: every (tp, pp) instance both pools can run, the same on both sides of a pair, up to 4 "
            "instances a unit (pp > 1: a and d only); not searched: mixed prefill/decode configurations, "
            "Algorithm 2's cross-node stages (plain `pdserve plan` without --compare-modes searches those)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compare-modes", action="store_true",
                   help="rank colocated, disaggregated (with and without reuse) and conditional serving by predicted "
                        "per-GPU goodput (on by default for a lengths file with sessions or shared prefixes)")
    p.add_argument("--pd-thresholds", type=int, nargs="+", default=list(THRESHOLDS), metavar="TOKENS",
                   help="conditional disaggregation: uncached-prompt thresholds to try (default: %(default)s)")
    p.add_argument("--colocated-instances", type=int, default=2,
                   help="engines of the colocated candidates (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE,
                   help="prompt tokens per chunked iteration: colocated chunks and conditional local prefills "
                        "(decode.max_num_batched_tokens; default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the ranking as JSON")


def run_modes(args: argparse.Namespace, spec: SearchSpec, cluster_file: ClusterFile | None) -> int:
    if any(t < 1 for t in args.pd_thresholds) or args.colocated_instances < 1 or args.chunk_size < 1:
        raise ValueError("plan: --pd-thresholds, --colocated-instances and --chunk-size must be >= 1")
    comparison = compare_modes(spec, thresholds=args.pd_thresholds, colocated_instances=args.colocated_instances,
                               chunk_size=args.chunk_size,
                               progress=lambda i, n, msg: print(f"  [{i}/{n}] {msg}", file=sys.stderr))
    print(format_ranking(comparison))
    win = comparison.winner
    if win.goodput_rps <= 0:
        print("no mode meets the SLOs on this workload")
        return 1
    plan = reuse_plan(Plan.from_scored(scored(win, spec), spec, model_arg=args.model, cluster_file=cluster_file,
                                       workload_arg=args.workload), win, spec)
    config = plan.serving_config()
    plan_out = args.plan_output or str(Path(args.output).with_suffix("")) + ".plan.yaml"
    Path(args.output).write_text(config.to_yaml())
    Path(plan_out).write_text(plan.to_yaml())
    print(f"wrote {args.output} ({settings(win)}) and {plan_out}")
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(comparison, spec), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def scored(r: ModeResult, spec: SearchSpec) -> Scored:
    """The winner as the planner's `Scored` unit (a colocated unit is one engine)."""
    per_unit = r.goodput_rps / r.num_instances[0] if r.unit.decode is None else r.goodput_rps
    return Scored(r.unit, per_unit, max(1, max_replicas(r.unit, spec.cluster)))


def reuse_plan(plan: Plan, r: ModeResult, spec: SearchSpec) -> Plan:
    """`plan` with the reuse settings system `r` was simulated with in its deployment, which
    `serving_config` writes as engine.enable_prefix_caching, router.*_policy, router.pd_* and the
    decode pool's max_num_batched_tokens (a chunked engine's chunk: reuse_settings.py). With
    prefix caching under `spec.decode_token_limit`, each engine's KV pool is that many tokens (the
    simulated prefix caches' capacity), fixed (gpu_memory_utilization: null)."""
    deploy = r.settings.deploy_fields(plan.deploy)
    engine = deploy["engine"]
    if r.settings.prefix_caching and spec.decode_token_limit is not None:
        gb = kv_pool_gb(spec.model, spec.cluster.gpu_for("decode"), r.unit.prefill, spec.decode_token_limit)
        if gb < engine.get("kv_cache_memory_gb", float("inf")):
            engine = {**engine, "kv_cache_memory_gb": gb, "gpu_memory_utilization": None}
    return replace(plan, deploy={**deploy, "engine": engine})


def settings(r: ModeResult) -> str:
    if r.system == "a":
        return "no prefix reuse"
    out = "engine.enable_prefix_caching: true, router policies: cache_aware"
    return out + (f", router.pd_threshold_tokens: {r.threshold}" if r.threshold else "")


def format_ranking(c: ModeComparison) -> str:
    rows = [f"{'#':>2}  {'system':<48} {'deployment':<26} {'goodput':>8} {'/GPU':>7} {'hits':>6} {'pulled/req':>10} {'local':>6}"]
    for i, r in enumerate(c.ranking(), 1):
        u = r.reuse
        rows.append(f"{i:>2}  ({r.system}) {SYSTEMS[r.system]:<44} {r.describe():<26} {r.goodput_rps:>8.3f} "
                    f"{r.per_gpu_goodput:>7.3f} {u.get('prefix_hit_rate', 0):>6.1%} "
                    f"{u.get('pulled_tokens_per_request', 0):>10.1f} {u.get('local_prefill_share', 0):>6.1%}")
    e = c.best("e")
    rows.append("(predicted goodput in req/s; hits: prompt tokens not computed; pulled/req: KV tokens moved per request; "
                "local: requests prefilled on their decode instance)")
    if e is not None and e.goodput_rps > 0:
        rows.append(f"conditional threshold chosen: {e.threshold} uncached tokens")
    elif e is not None:
        rows.append("conditional threshold chosen: none (no threshold meets the SLOs at any rate)")
    gain = (f"{c.gain():.2f}× the per-GPU goodput of disaggregated serving without reuse" if c.gain() != float("inf")
            else "disaggregated serving without reuse meets the SLOs at no rate")
    rows.append(SEARCHED)
    rows.append(f"winner: ({c.winner.system}) {SYSTEMS[c.winner.system]}, {c.winner.describe()}: {gain}")
    return "\n".join(rows)


def to_json(c: ModeComparison, spec: SearchSpec) -> dict:
    turns = getattr(spec.workload, "mean_turns", 1.0)  # goodput in sessions/s, as `pdserve bench --sessions` reads it

    def row(r: ModeResult) -> dict:
        return {"system": r.system, "label": SYSTEMS[r.system], "deployment": r.describe(),
                "num_prefill": r.num_instances[0] if r.unit.decode else 0,
                "num_decode": r.num_instances[1] if r.unit.decode else r.num_instances[0],
                "threshold": r.threshold, "goodput_rps": r.goodput_rps, "num_gpus": r.num_gpus,
                "per_gpu_goodput_rps": r.per_gpu_goodput, "goodput_sessions_per_s": r.goodput_rps / turns, **r.reuse}

    e = c.best("e")
    return {"workload": spec.workload.name, "mean_turns": turns, "slo": {"ttft_s": spec.slo.ttft_s, "tpot_s": spec.slo.tpot_s,
                                                    "attainment": spec.slo.attainment},
            "ranking": [row(r) for r in c.ranking()], "winner": c.winner.system,
            "threshold": e.threshold if e and e.goodput_rps > 0 else None, "gain_over_a": c.gain() if c.gain() != float("inf") else None,
            "candidates": [row(r) for r in c.results]}
