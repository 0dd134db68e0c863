"""Layer-wise KV streaming in serving: how much of the KV transfer hides behind the prefill forward.

A real local Ray deployment (SmolLM2-135M, 1 prefill + 1 decode instance, CPU, grpc transport, raw
codec) serves 1,024-token prompts (max_tokens 4), one request at a time, alternately with
`kvtransfer.layerwise` off and on (the deployment is relaunched for each phase: off, on, off, on).
Per request it reads the router's `pdserve_timings` and both instances' step logs:

  transfer_s     decode's pull, admitted -> KV landed (decode's clock)
  kv_exposed_s   the part of the pull after decode had the first token (without streaming the first
                 token comes with the handle, so all of it)
  gap_s          start of decode's first step (the one that runs the first token; it waits for both
                 the KV and the first token) - end of the prefill forward, from the step logs
                 (wall clock, one host): an upper bound on "KV landed - end of the forward" that also
                 holds the router hop and step-loop wake-up
  hidden share   1 - median kv_exposed_s (on) / median transfer_s (off)

Usage: python benchmarks/layerwise.py [--requests 6] [--rounds 2] [--prompt-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics

import httpx
import ray

from pdserve.config import EngineConfig, KVTransferConfig, RouterConfig, ServingConfig
from pdserve.placement.launch import Deployment, launch


def one(url: str, prompt: list[int], max_tokens: int) -> dict[str, float]:
    """One streamed completion; its final chunk's pdserve_timings."""
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    timings: dict[str, float] = {}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                timings = json.loads(line[6:]).get("pdserve_timings") or timings
    assert timings, "no pdserve_timings in the stream"
    return timings


def gap_s(d: Deployment, since: dict[str, int], n: int) -> float:
    """Start of decode's first step of the request (n new tokens' KV cached, 1 new) - end of the
    prefill forward (the step that computed the n prompt tokens), wall clock."""
    logs = d.step_logs(since)
    (pre,) = [s for w, (_, steps) in logs.items() if w in d.prefill for s in steps if s.new_tokens == (n,)]
    dec = [s for w, (_, steps) in logs.items() if w in d.decode for s in steps if s.cached_tokens == (n,)]
    return dec[0].start_s - (pre.start_s + pre.duration_s)


def phase(layerwise: bool, prompt: list[int], requests: int, max_tokens: int) -> list[dict[str, float]]:
    cfg = ServingConfig(engine=EngineConfig(device="cpu", max_model_len=2048), mode="disaggregated",
                        router=RouterConfig(port=0), kvtransfer=KVTransferConfig(transport="grpc", codec="raw",
                                                                                 layerwise=layerwise))
    d = launch(cfg)
    try:
        one(d.url, prompt[::-1], max_tokens)  # warm-up
        rows = []
        for i in range(requests):
            since = {w: first + len(steps) for w, (first, steps) in d.step_logs().items()}
            t = one(d.url, [(x + i) % 40000 + 100 for x in prompt], max_tokens)
            rows.append({**t, "gap_s": gap_s(d, since, len(prompt)), "layerwise": float(layerwise)})
        return rows
    finally:
        d.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=4)
    args = ap.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    prompt = [(7 * i) % 40000 + 100 for i in range(args.prompt_tokens)]
    rows: list[dict[str, float]] = []
    for _ in range(args.rounds):
        for layerwise in (False, True):
            rows += phase(layerwise, prompt, args.requests, args.max_tokens)
            print(f"phase layerwise={layerwise}: " + ", ".join(f"{k} {r[k]:.4f}" for r in rows[-args.requests:]
                                                             for k in ("transfer_s", "kv_exposed_s")), flush=True)
    med = {lw: {k: statistics.median(r[k] for r in rows if r["layerwise"] == lw)
                for k in ("ttft_s", "prefill_s", "transfer_s", "kv_exposed_s", "gap_s")} for lw in (0.0, 1.0)}
    print(f"{args.prompt_tokens}-token prompts, {args.requests * args.rounds} requests per mode, medians (s)")
    print(f"{'layerwise':>9} {'ttft_s':>8} {'prefill_s':>9} {'transfer_s':>10} {'kv_exposed_s':>12} {'gap_s':>8}")
    for lw, m in med.items():
        print(f"{'on' if lw else 'off':>9} {m['ttft_s']:8.3f} {m['prefill_s']:9.3f} {m['transfer_s']:10.4f} "
              f"{m['kv_exposed_s']:12.4f} {m['gap_s']:8.4f}")
    off, on = med[0.0], med[1.0]
    print(f"hidden share = 1 - exposed(on) / transfer(off) = {1 - on['kv_exposed_s'] / off['transfer_s']:.1%}")
    print(f"gap (step logs, upper bound on landed - forward end): off {off['gap_s']:.4f}, on {on['gap_s']:.4f}; "
          f"hidden share by it (router hop counted as exposed) = 1 - gap(on) / transfer(off) = "
          f"{1 - on['gap_s'] / off['transfer_s']:.1%}")
    ray.shutdown()


if __name__ == "__main__":
    main()
