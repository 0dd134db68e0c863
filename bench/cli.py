"""`pdserve bench`: replay a workload against an OpenAI-compatible endpoint and report goodput.

  pdserve bench --url URL --workload sharegpt --num-requests 200 --rate 1 2 4 --ttft 1s --tpot 100ms -o DIR
  pdserve bench --url URL --goodput ttft:1000 tpot:100 --gpus 2 -o DIR      (no --rate: search the rate)
  pdserve bench compare DIR1 DIR2 ... [-o OUT]                               (overlay results)
  pdserve bench lengths --workload sharegpt --tokenizer MODEL -n 1000 -o lengths.jsonl
  pdserve bench --url URL --sessions sharegpt -n 20 --rate 0.1 0.2 --think-time 1 -o DIR  (multi-turn sessions)
  pdserve bench lengths --sessions sharegpt -n 50 -o sessions.jsonl                        (a session trace)
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from pdserve.bench.session_cli import CHAT_PATH, add_session_args
from pdserve.bench.units import duration_arg
from pdserve.config import SLOConfig

DEFAULT_SLO = SLOConfig()  # the serving config's defaults


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible endpoint: SLO attainment and goodput",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_args(p)
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="bench_command")
    c = sub.add_parser("compare", help="overlay the results of several runs (e.g. one per system)")
    c.add_argument("dirs", nargs="+", type=Path, help="results directories written by `pdserve bench -o`")
    c.add_argument("-o", "--output-dir", type=Path, default=Path("bench-compare"),
                   help="where compare.json and the overlay plots go")
    c.add_argument("--at-rate", type=float, default=None,
                   help="per-GPU rate for the latency CDFs and SLO-scale curves (default: the highest "
                        "per-GPU rate every run measured)")
    c.add_argument("--ttft", type=duration_arg, default=None, help="compare at this TTFT SLO instead of each run's")
    c.add_argument("--tpot", type=duration_arg, default=None, help="compare at this TPOT SLO instead of each run's")
    c.add_argument("--slo-scale", type=float, default=1.0, help="multiply the SLOs compared at by this")
    c.set_defaults(func=_compare)
    lengths = sub.add_parser("lengths", help="write a workload's lengths file (the planner's input)")
    _add_workload_args(lengths)
    add_session_args(lengths)
    lengths.add_argument("-o", "--output", type=Path, required=True, help="the lengths file to write (JSONL)")
    lengths.set_defaults(func=_lengths)


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", "--dataset-name", default="sharegpt",
                   help="sharegpt | humaneval | longbench | PATH of a lengths file (default sharegpt)")
    p.add_argument("--tokenizer", default=None,
                   help="the served model's tokenizer: HF directory, tokenizer.json or pdserve model name "
                        "(default: --model, else smollm2-135m)")
    p.add_argument("--model", default=None, help="model name sent in requests (default: the endpoint's first model)")
    p.add_argument("-n", "--num-requests", "--num-prompts", type=int, default=100,
                   help="requests per rate (the same requests at every rate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request sample and of the arrival times")
    p.add_argument("--max-input-len", type=int, default=None,
                   help="drop prompts longer than this many tokens (default: keep all)")
    p.add_argument("--max-output-len", type=int, default=None,
                   help="clamp outputs to this many tokens (default: the dataset's lengths)")
    p.add_argument("--max-model-len", type=int, default=2048, help="drop pairs with prompt + output >= this")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", "--base-url", default=None, help="endpoint root, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as `Authorization: Bearer KEY` (default: $OPENAI_API_KEY)")
    _add_workload_args(p)
    add_session_args(p)
    p.add_argument("--rate", "--request-rate", nargs="+", type=float, default=None,
                   help="request rates to measure (req/s, 'inf' = all at once); without it, search the goodput")
    p.add_argument("--goodput", nargs="*", default=None, metavar="KEY:MS",
                   help="search the rate for goodput; optional vLLM-style SLOs in ms, e.g. ttft:1000 tpot:100")
    p.add_argument("--search-start-rate", type=float, default=1.0,
                   help="req/s of the first point when searching the goodput (doubled or halved from there)")
    p.add_argument("--search-steps", type=int, default=3, help="bisection steps after bracketing the goodput")
    p.add_argument("--ttft", type=duration_arg, default=None,
                   help=f"TTFT SLO, e.g. 1s or 250ms; plain numbers are seconds (default: {DEFAULT_SLO.ttft_s:g}s)")
    p.add_argument("--tpot", type=duration_arg, default=None,
                   help=f"TPOT SLO, e.g. 100ms; plain numbers are seconds (default: {DEFAULT_SLO.tpot_s * 1e3:g}ms)")
    p.add_argument("--slo-from-unloaded", nargs=2, type=float, default=None, metavar=("TTFT_X", "TPOT_X"),
                   help="set the SLOs to these multiples of the median unloaded TTFT and TPOT (measured first)")
    p.add_argument("--attainment", type=_fraction, default=DEFAULT_SLO.attainment,
                   help="share of requests that must meet both SLOs: 0.9 or 90 (default: 90%%)")
    p.add_argument("--gpus", type=float, default=None,
                   help="GPUs (or CPU instances) of the deployment, for per-GPU goodput (default: what a pdserve "
                        "server reports at /v1/models, else 1)")
    p.add_argument("--cv", type=float, default=None,
                   help="coefficient of variation of Gamma inter-arrival times (default: 1, Poisson)")
    p.add_argument("--burstiness", type=float, default=None,
                   help="vLLM's Gamma shape instead of --cv: CV = 1/sqrt(burstiness) (default: 1, Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight; later arrivals wait client-side (default: no limit)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests sent first")
    p.add_argument("--label", default=None, help="name of this system in comparisons (default: the output dir name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output-dir", type=Path, default=None,
                   help="results directory: summary.json, points.csv, requests.csv/jsonl, plots (default: print only)")


def _fraction(text: str) -> float:
    value = float(text)
    return value / 100 if value > 1 else value


def _run(args: argparse.Namespace) -> int:
    from pdserve.bench.arrivals import cv_from_burstiness
    from pdserve.bench.client import Endpoint
    from pdserve.bench.loadgen import LoadConfig
    from pdserve.bench.quick import slo_from_unloaded
    from pdserve.bench.runner import BenchConfig, run_rates, save, search_goodput

    from pdserve.bench.served_model import served_model
    from pdserve.bench.units import fmt_duration

    if args.url is None:
        raise ValueError("--url is required (or use `pdserve bench compare DIR...`)")
    served = served_model(args.url, args.api_key)
    model = args.model or served.id
    gpus = args.gpus if args.gpus is not None else (served.num_gpus or 1.0)
    if args.gpus is None:
        print(f"GPUs: {gpus:g}, " + (f"as the server reports ({served.shape})" if served.shape else
                                     "since the server does not report its deployment (pass --gpus)"))
    cv = cv_from_burstiness(args.burstiness) if args.burstiness is not None else (1.0 if args.cv is None else args.cv)
    if args.sessions:
        from pdserve.bench import session_cli

        path = CHAT_PATH if args.endpoint == "/v1/completions" else args.endpoint
        endpoint = Endpoint(args.url, path, model, args.api_key)
        return session_cli.run(args, endpoint, gpus, cv, args.tokenizer or model or "smollm2-135m")
    workload, meta = _build_workload(args, model)
    endpoint = Endpoint(args.url, args.endpoint, model, args.api_key)
    if args.slo_from_unloaded:
        slo = slo_from_unloaded(endpoint, workload, *args.slo_from_unloaded, attainment=args.attainment)
        print(f"SLOs from unloaded latency: TTFT {slo.ttft_s * 1e3:.1f} ms, TPOT {slo.tpot_s * 1e3:.1f} ms")
    else:
        slo = slo_from_args(args)
    load = LoadConfig(rate=1.0, cv=cv, seed=args.seed, max_concurrency=args.max_concurrency,
                      timeout_s=args.timeout, progress=not args.no_progress)
    cfg = BenchConfig(endpoint, slo, gpus, load, args.warmup, args.label)
    if args.rate:
        finite = [r for r in args.rate if math.isfinite(r) and r > 0]
        print(f"{len(workload)} requests at {len(args.rate)} rates: arrivals alone take "
              f"{fmt_duration(sum(len(workload) / r for r in finite))}, plus each point's tail")
        result = run_rates(cfg, workload, args.rate)
    else:
        result = search_goodput(cfg, workload, args.search_start_rate, args.search_steps)
    if args.output_dir is not None:
        print(f"results in {save(result, args.output_dir, workload, meta)}")
    print(result.table())
    return 0


def slo_from_args(args: argparse.Namespace) -> SLOConfig:
    """The SLOs of --ttft / --tpot / --goodput KEY:MS and --attainment, defaults filled in."""
    ttft, tpot = args.ttft, args.tpot
    for item in args.goodput or ():
        key, _, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: expected KEY:MS, got {item!r}") from None
        if key == "ttft":
            ttft = ms / 1e3
        elif key == "tpot":
            tpot = ms / 1e3
        else:
            raise ValueError(f"--goodput: unknown SLO {key!r} (ttft and tpot are supported)")
    return SLOConfig(ttft or DEFAULT_SLO.ttft_s, tpot or DEFAULT_SLO.tpot_s, args.attainment)


def _build_workload(args: argparse.Namespace, model: str | None):
    from pdserve.bench.tokenizer import load_tokenizer
    from pdserve.bench.workload import WorkloadSpec, build_workload

    spec = WorkloadSpec(args.workload, args.num_requests, args.seed, args.max_input_len,
                        args.max_output_len, args.max_model_len)
    tokenizer = load_tokenizer(args.tokenizer or model or "smollm2-135m")
    meta = {"name": spec.name, "seed": spec.seed, "max_input_len": spec.max_input_len,
            "max_output_len": spec.max_output_len, "max_model_len": spec.max_model_len,
            "tokenizer": str(args.tokenizer or model or "smollm2-135m")}
    return build_workload(spec, tokenizer), meta


def _lengths(args: argparse.Namespace) -> int:
    from pdserve.bench.lengths import write_lengths

    if args.sessions:
        from pdserve.bench.session_cli import write_trace

        return write_trace(args, args.tokenizer or args.model or "smollm2-135m")
    workload, _ = _build_workload(args, args.model)
    n = write_lengths(args.output, [w.lengths() for w in workload])
    print(f"wrote {n} requests to {args.output}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pdserve.bench.compare import compare
    from pdserve.bench.results import read_results

    slo = None
    if args.ttft is not None or args.tpot is not None or args.slo_scale != 1.0:
        base = SLOConfig(**read_results(args.dirs[0]).summary["slo"])
        slo = SLOConfig(args.ttft or base.ttft_s, args.tpot or base.tpot_s, base.attainment).scaled(args.slo_scale)
    print(compare(args.dirs, args.output_dir, args.at_rate, slo, args.slo_scale))
    return 0
