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
    from pdserve.chaos import ChaosRig


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="inject KV-transfer faults at each window of a request; check invariants")
    p.add_argument("--model", default="smollm2-135m", help="model name or Hugging Face directory")
    p.add_argument("--transport", default="grpc", choices=["loopback", "grpc", "torch"],
                   help="the KV transport the faults are injected into")
    p.add_argument("--timeout-s", type=float, default=3.0, help="KV transfer timeout, seconds")
    p.add_argument("--lease-s", type=float, default=5.0, help="prefill KV lease, seconds")
    p.add_argument("--reduced", action="store_true", help="one fault per window instead of every fault")
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
    rig = ChaosRig(args.model, args.transport, args.timeout_s, args.lease_s)
    if args.soak is not None:
        return _soak(rig, args)
    cells = run_matrix(rig, cells_of(args.reduced))
    print(format_matrix(cells))
    total = time.monotonic() - t0
    print(f"{sum(c.ok for c in cells)}/{len(cells)} cells pass in {total:.1f} s ({args.transport}, {args.model})")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "transport": args.transport, "seconds": round(total, 1),
                                         "cells": [asdict(c) for c in cells]}, indent=2))
    return 0 if all(c.ok for c in cells) else 1


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
