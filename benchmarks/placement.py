"""Placement benchmarks: simulator speed (simulated requests per second of wall and CPU time) and
the time to plan OPT-66B on 4 nodes × 8 A100s from DistServe's published profile.

  python benchmarks/placement.py [--requests 20000] [--skip-plan]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.hardware import load_gpu
from pdserve.placement.latency import instance_latency
from pdserve.placement.model_spec import load_model
from pdserve.placement.profile_file import load_profile
from pdserve.placement.simulator import simulate
from pdserve.placement.transfer import TransferModel
from pdserve.placement.workload import sharegpt_like


def sim_speed(n: int) -> None:
    src, model, gpu = load_profile("distserve-a100"), load_model("opt-13b"), load_gpu("a100-80g")
    p, d = instance_latency(src, model, gpu, 2, 1), instance_latency(src, model, gpu, 1, 1)
    xfer = TransferModel(kv_bytes_per_token=model.kv_bytes_per_token, bytes_per_s=300e9)
    trace = sharegpt_like().trace(n, seed=0)
    cases = [("disaggregated 1×P TP2 + 2×D TP1", SimDeployment(prefill=(p,), decode=(d, d), transfer=xfer), 7.0),
             ("colocated TP2 prefill-priority", SimDeployment(mode="colocated", prefill=(p,)), 2.5),
             ("colocated TP2 chunked", SimDeployment(mode="colocated", prefill=(p,), colocated_policy="chunked"), 2.0)]
    print(f"| case | rate (req/s) | joint attainment | sim req/s (wall) | sim req/s (CPU) |\n|---|---|---|---|---|")
    for name, dep, rate in cases:
        w, c = time.perf_counter(), time.process_time()
        res = simulate(dep, trace, rate)
        w, c = time.perf_counter() - w, time.process_time() - c
        print(f"| {name} | {rate} | {res.attainment(0.25, 0.1):.1%} | {n / w:,.0f} | {n / c:,.0f} |")


def plan_time() -> None:
    cmd = ["pdserve", "plan", "--model", "opt-66b", "--profile", "distserve-a100", "--colocated-profile",
           "distserve-a100-vllm", "--nodes", "4", "--gpus-per-node", "8", "--inter-node-gbps", "25",
           "--ttft", "2.5", "--tpot", "0.15", "--decode-token-limit", "65536", "--jobs", "2",
           "-o", "/tmp/opt66b-serving.yaml"]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    print(" ".join(cmd))
    print(out.stdout)
    print(f"wall time: {time.perf_counter() - t:.1f} s (exit {out.returncode})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--skip-plan", action="store_true")
    a = ap.parse_args()
    sim_speed(a.requests)
    if not a.skip_plan:
        plan_time()
    sys.exit(0)
