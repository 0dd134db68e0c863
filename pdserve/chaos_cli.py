"""`pdserve chaos` command line (pdserve/chaos.py does the work; imported only when the command runs,
so the CLI starts without torch)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.chaos import Cell, ChaosRig


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="inject faults at each window of a request's life; check the invariants")
    p.add_argument("--model", default="smollm2-135m", help="model name or Hugging Face directory")
    p.add_argument("--transport", default="grpc", choices=["loopback", "grpc", "torch"],
                   help="the KV transport the faults are injected into")
    p.add_argument("--timeout-s", type=float, default=3.0, help="KV transfer timeout, seconds")
    p.add_argument("--lease-s", type=float, default=5.0, help="prefill KV lease, seconds")
    p.add_argument("--reduced", action="store_true", help="one fault per window instead of every fault")
    p.add_argument("--only", choices=["kv", "lifecycle"],
                   help="kv: the KV-transfer windows (in-process, chunk faults); lifecycle: every other window "
                        "(a local Ray deployment; kill a worker or the router, client disconnect). Default: both")
    p.add_argument("--json", type=Path, help="write the matrix (or the soak report) here as JSON")
    p.add_argument("--soak", type=float, metavar="MINUTES",
                   help="instead of the matrix: mixed load with disconnects and random faults for MINUTES, "
                        "then the invariants and resource accounting (RSS, fds, threads, KV blocks)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    from pdserve.chaos import ChaosRig, cells_of, format_matrix, run_matrix

    t0 = time.monotonic()
    if args.soak is not None:
        return _soak(ChaosRig(args.model, args.transport, args.timeout_s, args.lease_s), args)
    if args.transport == "loopback" and args.only != "kv":
        print("--transport: loopback moves KV within one process only; the lifecycle cells need grpc or torch "
              "(or pass --only kv)")
        return 2
    cells = []
    if args.only in (None, "kv"):
        cells += run_matrix(ChaosRig(args.model, args.transport, args.timeout_s, args.lease_s), cells_of(args.reduced))
    if args.only in (None, "lifecycle"):
        cells += _lifecycle(args)
    print(format_matrix(cells))
    total = time.monotonic() - t0
    print(f"{sum(c.ok for c in cells)}/{len(cells)} cells pass in {total:.1f} s ({args.transport}, {args.model})")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "transport": args.transport, "seconds": round(total, 1),
                                         "cells": [asdict(c) for c in cells]}, indent=2))
    return 0 if all(c.ok for c in cells) else 1


def _lifecycle(args: argparse.Namespace) -> list[Cell]:
    """The lifecycle cells on a fresh local Ray whose every process installs the fault-point handler."""
    import ray

    from pdserve.chaos import format_matrix
    from pdserve.chaos_hooks import SETUP_HOOK
    from pdserve.chaos_lifecycle import PROMPT, LifecycleRig, lifecycle_cells
    from pdserve.llm import LLM
    from pdserve.types import SamplingParams

    max_tokens = 12
    llm = LLM(args.model, device="cpu", num_threads=1)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reference = llm.generate([PROMPT], params, use_tqdm=False)[0].text
    del llm
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": SETUP_HOOK})
    try:
        rig = LifecycleRig(args.model, reference, args.transport, args.timeout_s, args.lease_s, max_tokens)
        try:
            cells = []
            for window, fault in lifecycle_cells(args.reduced):
                cells.append(rig.run_cell(window, fault))
                print(format_matrix(cells[-1:]).splitlines()[-1], flush=True)
            return cells
        finally:
            rig.close()
    finally:
        ray.shutdown()


def _soak(rig: ChaosRig, args: argparse.Namespace) -> int:
    from pdserve.soak import run_soak

    report = run_soak(rig, args.soak)
    print(f"soak {report.minutes:g} min: {report.rounds} rounds ({report.num_faults} with a fault, "
          f"{report.num_disconnects} disconnects), {len(report.failed)} broke an invariant")
    print(f"after warm-up {report.baseline}\nat the end    {report.final}\n{'pass' if report.ok else 'FAIL'}")
    for line in report.failed[:20]:
        print("  " + line)
    if args.json:
        args.json.write_text(json.dumps(asdict(report) | {"ok": report.ok}, indent=2))
    return 0 if report.ok else 1
