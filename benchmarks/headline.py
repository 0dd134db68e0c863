"""Headline comparison on this machine: per-core goodput of disaggregated vs colocated serving.

Three deployments of SmolLM2-135M on the same 2 cores, one core per engine process:
  (a) disaggregated: 1 prefill + 1 decode instance
  (b) colocated, prefill-priority continuous batching (vLLM's default), 2 instances
  (c) colocated, chunked prefill (Sarathi), 2 instances
each replaying the same ShareGPT workload (capped to fit) at the same Poisson rates. SLOs are set
from the unloaded latency of single requests: TTFT = 4x and TPOT = 2x (DistServe-style
SLO scaling around the unloaded values; measured once, sequentially, on the first system run). Goodput
is read off each attainment curve at 90%.

Each system's results directory also gets `steps.jsonl`: every engine step its instances ran,
per rate (the input of an in-situ profile, `pdserve profile --from-steps`, and of
benchmarks/fidelity.py --calibration, which wants a run on another `--seed`), and `probes.jsonl`:
the steps of a short speed probe (the same few requests, one at a time) before the first rate point
and after every point — how fast the host ran right then (benchmarks/fidelity.py --host-speed
probes; the host's speed moves by 5-10% within minutes here, more than 20 s of probing tracks).

Usage: python benchmarks/headline.py [-o results/headline] [--num-requests 40] [--rates 0.2 0.4 ...] [--seed 0]
Then:  pdserve bench compare results/headline/disaggregated results/headline/colocated-* -o results/headline/compare
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import time
from pathlib import Path

from pdserve.bench.client import Endpoint
from pdserve.bench.loadgen import LoadConfig, run_load
from pdserve.bench.quick import median_latency, unloaded_records
from pdserve.bench.runner import BenchConfig, run_rates, save
from pdserve.bench.tokenizer import load_tokenizer
from pdserve.bench.workload import WorkloadRequest, WorkloadSpec, build_workload
from pdserve.config import SLOConfig
from pdserve.config import EngineConfig, PoolConfig, RouterConfig, ServingConfig

SYSTEMS = {
    "disaggregated": dict(mode="disaggregated", prefill=PoolConfig(instances=1), decode=PoolConfig(instances=1)),
    "colocated-prefill-priority": dict(mode="colocated", colocated_policy="prefill_priority",
                                       decode=PoolConfig(instances=2)),
    "colocated-chunked": dict(mode="colocated", colocated_policy="chunked", decode=PoolConfig(instances=2)),
}
# Sarathi sizes the chunk so a mixed step stays near the TPOT budget: on this CPU a prefill token
# costs ~3 ms and a decode step ~50 ms, so 32-token chunks keep mixed steps around 2x a decode step.
CHUNK_TOKENS = 32
# The host-speed probe between rate points: a few requests sent one at a time (~10 s on SmolLM2).
NUM_PROBE_REQUESTS, PROBE_OUTPUT_LEN, PROBE_SEED = 4, 24, 1000


def deploy(name: str, chunk_tokens: int):
    import ray

    from pdserve.placement.launch import launch

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = ServingConfig(engine=EngineConfig(num_threads=1), router=RouterConfig(port=0, max_pending_requests=4096),
                        **SYSTEMS[name])
    if cfg.colocated_policy == "chunked":
        cfg = cfg.replace(decode=dataclasses.replace(cfg.decode, max_num_batched_tokens=chunk_tokens))
    return launch(cfg), cfg


class PointRecorder:
    """run_rates' `after` hook. After each rate point, appends the steps every engine ran during it
    to steps.jsonl ({"worker", "rate", **StepRecord}: the input of an in-situ profile, `pdserve
    profile --from-steps`); then, with probe requests, sends them one at a time and appends their
    steps to probes.jsonl ({"worker", "probe": i, ...}): probe i runs just before the i-th rate
    point (after the warm-up for i = 0), on an otherwise idle server."""

    def __init__(self, deployment, endpoint: Endpoint, out_dir: Path, probe_requests: list[WorkloadRequest]) -> None:
        self.deployment, self.endpoint, self.probe_requests = deployment, endpoint, probe_requests
        self.steps_file, self.probes_file = out_dir / "steps.jsonl", out_dir / "probes.jsonl"
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in (self.steps_file, self.probes_file):
            f.unlink(missing_ok=True)
        self.cursor: dict[str, int] = {}
        self.num_probes = 0

    def __call__(self, rate: float | None) -> None:
        self._collect(self.steps_file if rate is not None else None, rate=rate)  # the warm-up's: cursor only
        if self.probe_requests:
            load = LoadConfig(rate=math.inf, max_concurrency=1, progress=False)
            records = asyncio.run(run_load(self.endpoint, self.probe_requests, load)).records
            if not all(r.ok for r in records):
                raise RuntimeError(f"speed probe failed: {next(r.error for r in records if not r.ok)}")
            self._collect(self.probes_file, probe=self.num_probes)
            self.num_probes += 1

    def _collect(self, path: Path | None, **tags) -> None:
        lines = []
        for worker, (first, records) in self.deployment.step_logs(self.cursor).items():
            self.cursor[worker] = first + len(records)
            lines += [json.dumps({"worker": worker, **tags, **r.to_json()}) + "\n" for r in records]
        if path is not None:
            with path.open("a") as f:
                f.writelines(lines)


def probe_workload(tokenizer, max_input_len: int) -> list[WorkloadRequest]:
    """The speed probe's requests: the same for every run and --seed, so probes compare across runs."""
    spec = WorkloadSpec("sharegpt", NUM_PROBE_REQUESTS, seed=PROBE_SEED, max_input_len=max_input_len)
    return [dataclasses.replace(w, output_len=PROBE_OUTPUT_LEN) for w in build_workload(spec, tokenizer)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="results/headline")
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.45, 0.6, 0.8])
    ap.add_argument("--seed", type=int, default=0,
                    help="picks the prompts and the arrival times (a calibration trace uses another seed)")
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--max-output-len", type=int, default=64)
    ap.add_argument("--ttft-scale", type=float, default=4.0)
    ap.add_argument("--tpot-scale", type=float, default=2.0)
    ap.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="chunked prefill's token budget per step")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    ap.add_argument("--no-probe", dest="probe", action="store_false",
                    help="skip the host-speed probe before and after every rate point (probes.jsonl)")
    args = ap.parse_args()
    import ray

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    spec = WorkloadSpec("sharegpt", args.num_requests, seed=args.seed, max_input_len=args.max_input_len,
                        max_output_len=args.max_output_len)
    tokenizer = load_tokenizer("smollm2-135m")
    workload = build_workload(spec, tokenizer)
    probe_requests = probe_workload(tokenizer, args.max_input_len)
    slo_file = out / "slo.json"
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    for name in args.systems:
        deployment, cfg = deploy(name, args.chunk_tokens)
        try:
            endpoint = Endpoint(deployment.url, model=cfg.model)
            if not slo_file.exists():  # measured once, unloaded, and shared by every system
                records = unloaded_records(endpoint, workload, num_requests=8)
                ttft, tpot = median_latency(records)
                # the requests themselves (with the server's breakdown) calibrate benchmarks/fidelity.py
                unloaded = [{"prompt_len": r.prompt_len, "output_len": r.output_len, "ttft_s": r.ttft_s,
                             "tpot_s": r.tpot_s, "server_timings": r.server_timings} for r in records]
                slo_file.write_text(json.dumps({"unloaded_ttft_s": ttft, "unloaded_tpot_s": tpot,
                                                "measured_on": name, "ttft_scale": args.ttft_scale,
                                                "tpot_scale": args.tpot_scale, "unloaded_requests": unloaded},
                                               indent=2))
            base = json.loads(slo_file.read_text())
            slo = SLOConfig(base["unloaded_ttft_s"] * args.ttft_scale, base["unloaded_tpot_s"] * args.tpot_scale, 0.9)
            bench = BenchConfig(endpoint, slo, gpus=2.0, load=LoadConfig(rate=1.0, seed=args.seed, progress=False),
                                warmup=2, label=name)
            t0 = time.perf_counter()
            after = PointRecorder(deployment, endpoint, out / name, probe_requests if args.probe else [])
            result = run_rates(bench, workload, args.rates, after=after)
            save(result, out / name, workload, {"name": spec.name, "seed": spec.seed,
                                                "max_input_len": spec.max_input_len,
                                                "max_output_len": spec.max_output_len})
            print(f"== {name} ({time.perf_counter() - t0:.0f} s)\n{result.table()}", flush=True)
            summary[name] = result.goodput.to_dict()
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        finally:
            deployment.shutdown()
            ray.shutdown()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
