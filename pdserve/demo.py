"""`pdserve demo`: the whole system on this machine in a few minutes.

Starts the default deployment (embedded Ray; 1 prefill + 1 decode instance on CPU with
SmolLM2-135M), sends real chat requests through the official OpenAI client, prints the answers
with their latency breakdown, then runs a short ShareGPT goodput benchmark against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from pdserve.config import ServingConfig

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a Python function that reverses a string.",
]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start the default local system, chat with it, benchmark it")
    p.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated",
                   help="disaggregated: 1 prefill + 1 decode instance; colocated: 1 instance doing both")
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: any free port)")
    p.add_argument("--no-bench", action="store_true", help="skip the short goodput benchmark")
    p.add_argument("--bench-requests", type=int, default=20,
                   help="requests per rate of the short benchmark (each rate replays the same ones; 20 lets "
                        "a 90%% target tolerate 2 misses)")
    p.add_argument("-o", "--output", default="results/demo", help="where the benchmark writes its results")
    p.set_defaults(func=run)


def chat(url: str, model: str) -> None:
    from openai import OpenAI

    from pdserve.bench.units import fmt_duration

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    for q in QUESTIONS:
        t0 = time.perf_counter()
        first = None
        parts = []
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                max_tokens=96, temperature=0.0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                parts.append(chunk.choices[0].delta.content)
        total = time.perf_counter() - t0
        ttft = (first or time.perf_counter()) - t0
        print(f"\n> {q}\n{''.join(parts).strip()}")
        print(f"  [TTFT {fmt_duration(ttft)}, total {fmt_duration(total)}, {len(parts)} chunks]")
    resp = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello in French."}], max_tokens=16, temperature=0.0)
    timings = resp.headers.get("x-pdserve-timings")
    print(f"\n> Say hello in French.\n{resp.parse().choices[0].message.content.strip()}")
    if timings:
        print(f"  latency breakdown (from the x-pdserve-timings header): {readable_timings(timings)}")


def readable_timings(header: str) -> str:
    """`queue_s=0.000832, prefill_s=0.133` -> `queue 832 µs, prefill 133 ms` (byte counts stay numbers)."""
    from pdserve.bench.units import fmt_duration

    parts = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key.endswith("_s"):
            parts.append(f"{key[:-2]} {fmt_duration(float(value))}")
        elif key:
            parts.append(f"{key} {float(value):.0f}")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    from pdserve.bench.units import fmt_duration
    from pdserve.placement.launch import launch
    from pdserve.serve import ray_session

    cfg = ServingConfig(mode=args.mode)
    cfg = cfg.replace(router=dataclasses.replace(cfg.router, port=args.port))
    with ray_session("local", cfg):
        print(f"pdserve demo: starting {cfg.mode} serving of {cfg.model} on a local Ray cluster ...", flush=True)
        t0 = time.perf_counter()
        deployment = launch(cfg)
        print(f"pdserve demo: ready at {deployment.url} after {fmt_duration(time.perf_counter() - t0)}", flush=True)
        try:
            chat(deployment.url, cfg.model)
            if not args.no_bench:
                from pdserve.bench.quick import quick_benchmark

                print("\npdserve demo: short goodput benchmark (ShareGPT; SLOs and rates from the same "
                      "requests sent one at a time first; about 3 minutes)")
                quick_benchmark(deployment.url, model=cfg.model, num_requests=args.bench_requests,
                                out_dir=args.output)
                print(f"results written to {args.output}/")
        finally:
            deployment.shutdown()
    return 0
