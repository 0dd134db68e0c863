"""Multi-turn headline on this machine (issue 16): per-core goodput of five deployments on chat sessions.

Five deployments of SmolLM2-135M on the same 2 cores, one core per engine process:
  (a) disaggregated: 1 prefill + 1 decode, no prefix caching (the deployment before issue 16)
  (b) colocated chunked prefill, 2 instances, prefix caching, cache-aware dispatch
  (c) colocated prefill-priority, 2 instances, prefix caching, cache-aware dispatch
  (d) disaggregated 1 + 1 with prefix caching on both sides (delta pulls) and cache-aware dispatch
  (e) (d) plus conditional disaggregation: decode prefills a prompt itself when at most
      `--threshold` of its tokens are uncached there (router.pd_threshold_tokens, the planner's choice),
      in chunks of at most CHUNK_TOKENS per decode step (decode.max_num_batched_tokens, as (b)'s chunks)
each replaying the same multi-turn ShareGPT sessions (bench.sessions, capped to fit: --max-turns,
--max-context-len, --max-user-len, --max-output-len) at the same session rates, each turn sent
--think-time after the previous answer (bench.session_load). The colocated baselines get the same
cache-aware dispatch as (d), so a conversation's turns find their history there too.

SLOs, as in benchmarks/headline.py: TTFT = 4x and TPOT = 2x the median unloaded latency, measured
once on the first system run ((a) by default: the deployment issue 16 starts from, so reuse is not
built into the SLO), over every turn of 3 sessions replayed one at a time. Goodput (sessions/s) is
read off each attainment curve at 90%; attainment is over every turn.

Outputs under -o: sessions.jsonl (the session trace as a lengths file with session fields: what
`pdserve plan` reads), slo.json, one `pdserve bench` results directory per system, summary.json (all
systems), and report.md (benchmarks/multiturn_report.py: the tables of BENCHMARKS.md §17).

Usage: python benchmarks/multiturn.py [-o results/multiturn] [--sessions 24] [--rates 0.25 0.5 0.8 1.2 1.8 2.6]
           [--threshold 128] [--systems a b c d e]

About 27 minutes on this machine with the defaults; run it on an idle machine (BENCHMARKS.md §17:
on a loaded one the host's load moved attainment more than any configuration did).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from multiturn_report import write_report

from pdserve.bench.client import Endpoint
from pdserve.bench.quick import median_latency
from pdserve.bench.session_bench import (SessionBenchConfig, run_session_rates, save_sessions,
                                         unloaded_session_records)
from pdserve.bench.session_load import SessionLoadConfig
from pdserve.bench.session_trace import write_session_trace
from pdserve.bench.sessions import SessionSpec, build_sessions
from pdserve.bench.tokenizer import load_tokenizer
from pdserve.config import EngineConfig, PoolConfig, RouterConfig, ServingConfig, SLOConfig

# Sarathi's rule as in benchmarks/headline.py: 32-token chunks keep a mixed step near 2x a decode step.
CHUNK_TOKENS = 32
# KV pool per engine: 0.5 GB holds ~10k tokens of SmolLM2 (46 KB/token), the whole live history of
# a dozen 1k-token sessions; the 1 GB default made Ray's memory monitor kill actors on this shared box.
KV_CACHE_GB = 0.5
UNLOADED_SESSIONS = 3  # replayed one at a time for the SLOs
# (e)'s threshold until the planner's choice is given (--threshold): turn 2+'s uncached part on its
# decode instance is the new user message and its template (<= 128 + 16 tokens with the default
# caps), a first turn is the whole prompt; 128 sends most later turns local and most first turns remote.
DEFAULT_THRESHOLD = 128
NAMES = {"a": "disaggregated", "b": "colocated-chunked+cache", "c": "colocated-prefill-priority+cache",
         "d": "disaggregated+cache", "e": "conditional+cache"}


def system_config(key: str, threshold: int) -> ServingConfig:
    """The serving config of system `key` (a-e, see the module docstring)."""
    plain = EngineConfig(num_threads=1, kv_cache_memory_gb=KV_CACHE_GB)
    cached = dataclasses.replace(plain, enable_prefix_caching=True)
    aware = dict(prefill_policy="cache_aware", decode_policy="cache_aware")
    router = dict(port=0, max_pending_requests=4096)
    one_each = dict(mode="disaggregated", prefill=PoolConfig(instances=1), decode=PoolConfig(instances=1))
    if key == "a":
        return ServingConfig(engine=plain, router=RouterConfig(**router), **one_each)
    if key in ("b", "c"):
        decode = PoolConfig(instances=2, max_num_batched_tokens=CHUNK_TOKENS) if key == "b" else PoolConfig(instances=2)
        return ServingConfig(mode="colocated", colocated_policy="chunked" if key == "b" else "prefill_priority",
                             engine=cached, decode=decode, router=RouterConfig(decode_policy="cache_aware", **router))
    if key == "d":
        return ServingConfig(engine=cached, router=RouterConfig(**aware, **router), **one_each)
    if key == "e":  # local prefills are chunked into decode steps under the same budget as (b)'s chunks
        return ServingConfig(engine=cached, router=RouterConfig(**aware, **router, pd_threshold_tokens=threshold),
                             mode="disaggregated", prefill=PoolConfig(instances=1),
                             decode=PoolConfig(instances=1, max_num_batched_tokens=CHUNK_TOKENS))
    raise ValueError(f"systems: unknown system {key!r} (known: {', '.join(NAMES)})")


def deploy(cfg: ServingConfig):
    import ray

    from pdserve.placement.launch import launch

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return launch(cfg)


def measure_slo(out: Path, endpoint: Endpoint, sessions, name: str, args: argparse.Namespace) -> SLOConfig:
    """The SLOs in out/slo.json, measured now (unloaded, on this system) when the file is not there yet."""
    slo_file = out / "slo.json"
    if not slo_file.exists():
        records = unloaded_session_records(endpoint, sessions, num_sessions=UNLOADED_SESSIONS)
        ttft, tpot = median_latency(records)
        turns = [{"turn": r.turn, "prompt_len": r.num_prompt_tokens, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s,
                  "server_timings": r.server_timings} for r in records]
        slo_file.write_text(json.dumps({"unloaded_ttft_s": ttft, "unloaded_tpot_s": tpot, "measured_on": name, "num_sessions": UNLOADED_SESSIONS,
                                        "ttft_scale": args.ttft_scale, "tpot_scale": args.tpot_scale,
                                        "unloaded_turns": turns}, indent=2))
    base = json.loads(slo_file.read_text())
    return SLOConfig(base["unloaded_ttft_s"] * args.ttft_scale, base["unloaded_tpot_s"] * args.tpot_scale, 0.9)


def run_system(key: str, sessions, meta: dict, out: Path, args: argparse.Namespace) -> dict:
    """Deploy system `key`, replay the sessions at every rate, save its results directory; its summary."""
    import ray

    name = NAMES[key]
    cfg = system_config(key, args.threshold)
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    deployment = deploy(cfg)
    try:
        endpoint = Endpoint(deployment.url, "/v1/chat/completions", cfg.model)
        slo = measure_slo(out, endpoint, sessions, name, args)
        load = SessionLoadConfig(rate=1.0, think_time_s=args.think_time, seed=args.seed)
        bench = SessionBenchConfig(endpoint, slo, gpus=2.0, load=load, warmup=2, label=f"({key}) {name}")
        result = run_session_rates(bench, sessions, args.rates, log=lambda s: print(f"  {key}: {s}", flush=True))
        save_sessions(result, out / name, sessions, meta)
    finally:
        deployment.shutdown()
        ray.shutdown()
    print(f"== ({key}) {name} ({time.perf_counter() - t0:.0f} s)\n{result.table()}", flush=True)
    return {"key": key, "name": name, "config": {"mode": cfg.mode, "colocated_policy": cfg.colocated_policy,
                                                 "prefix_caching": cfg.engine.enable_prefix_caching,
                                                 "prefill_policy": cfg.router.prefill_policy,
                                                 "decode_policy": cfg.router.decode_policy,
                                                 "pd_threshold_tokens": cfg.router.pd_threshold_tokens,
                                                 "decode_max_num_batched_tokens": cfg.decode.max_num_batched_tokens},
            "goodput": result.goodput.to_dict(), "turns_per_session": result.turns_per_session,
            "loadavg_1min": [load_before, os.getloadavg()[0]], "wall_s": time.perf_counter() - t0,
            "points": [p.to_dict() for p in result.points]}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="results/multiturn")
    ap.add_argument("--sessions", type=int, default=24, help="sessions per rate point (the same ones at each)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.8, 1.2, 1.8, 2.6],
                    help="new sessions per second")
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-context-len", type=int, default=1024)
    ap.add_argument("--max-user-len", type=int, default=128)
    ap.add_argument("--max-output-len", type=int, default=48)
    ap.add_argument("--think-time", type=float, default=1.0, help="seconds between an answer and the next turn")
    ap.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD,
                    help="(e)'s router.pd_threshold_tokens: uncached prompt tokens decode prefills itself")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttft-scale", type=float, default=4.0)
    ap.add_argument("--tpot-scale", type=float, default=2.0)
    ap.add_argument("--systems", nargs="+", default=list(NAMES), choices=list(NAMES))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    spec = SessionSpec(num_sessions=args.sessions, max_turns=args.max_turns, max_context_len=args.max_context_len,
                       max_user_len=args.max_user_len, max_output_len=args.max_output_len, seed=args.seed)
    sessions = build_sessions(spec, load_tokenizer("smollm2-135m"))
    meta = {**dataclasses.asdict(spec), "think_time_s": args.think_time, "tokenizer": "smollm2-135m"}
    write_session_trace(out / "sessions.jsonl", sessions, args.think_time)
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    summary["workload"] = meta
    for key in args.systems:
        summary[key] = run_system(key, sessions, meta, out, args)
        summary_file.write_text(json.dumps(summary, indent=2))
    print(write_report(out))


if __name__ == "__main__":
    main()
