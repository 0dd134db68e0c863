"""Engine step time as the serving path sees it: deploy the default disaggregated system, replay a
ShareGPT load, then read each worker's own step counters (WorkerStats.busy_s / num_steps /
num_step_tokens). Compare with `pdserve profile`'s prediction for the same batch shape.

    python benchmarks/step_time_in_serving.py [--rate 0.8] [--num-requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import ray

from pdserve.bench.client import Endpoint
from pdserve.bench.loadgen import LoadConfig, run_load
from pdserve.bench.tokenizer import load_tokenizer
from pdserve.bench.workload import WorkloadSpec, build_workload
from pdserve.config import EngineConfig, RouterConfig, ServingConfig
from pdserve.placement.launch import launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=0.8)
    ap.add_argument("--num-requests", type=int, default=30)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    deployment = launch(ServingConfig(engine=EngineConfig(num_threads=1), router=RouterConfig(port=0)))
    try:
        spec = WorkloadSpec("sharegpt", args.num_requests, seed=0, max_input_len=512, max_output_len=64)
        workload = build_workload(spec, load_tokenizer("smollm2-135m"))
        asyncio.run(run_load(Endpoint(deployment.url, model="smollm2-135m"), workload,
                             LoadConfig(rate=args.rate, progress=False)))
        time.sleep(1.0)
        for name, actor in {**deployment.prefill, **deployment.decode}.items():
            s = ray.get(actor.stats.remote())
            steps = max(1, s.num_steps)
            print(f"{name}: {s.num_steps} steps, mean step {1e3 * s.busy_s / steps:.1f} ms, "
                  f"{s.num_step_tokens / steps:.2f} tokens/step")
    finally:
        deployment.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
