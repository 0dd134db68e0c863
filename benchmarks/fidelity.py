"""Simulator fidelity: simulated vs measured joint SLO attainment of the same trace, per rate.

For every bench results directory (one per deployment, as benchmarks/headline.py writes them) and
every rate in it, the exact recorded trace (arrival offsets, prompt and output lengths) is replayed
through the placement simulator with a latency profile measured on this machine, and the simulated
joint attainment (TTFT and TPOT both met, the run's own SLOs) is compared with the measured one.

What is modelled, beyond the profiled forwards (see BENCHMARKS.md, simulator fidelity):
  - the deployment: 1 prefill + 1 decode instance, or 2 colocated instances (prefill-priority, or
    chunked prefill with the run's token budget), each engine on its own core;
  - the router's dispatch (least outstanding prompt tokens for prefill; least KV pressure then
    fewest in flight for decode/colocated: router/policies.py's, through placement/trace.py);
  - the engine's per-step overhead outside the forward and the client/router path before the first
    token, calibrated from the *unloaded* latency in slo.json (a separate sequential run), never from
    the rate sweep being compared;
  - with --calibration, everything from a calibration run of each system on another trace
    (benchmarks/headline.py --seed 1): an in-situ profile fitted to the engine steps it ran, how
    much slower a step runs beside the other busy engine of the host, the gaps between its steps,
    its client-path TTFT and its measured KV pulls (placement/calibrate.py `calibrate_in_situ`);
  - how fast the host ran during each rate point, as one factor on every step of that point
    (this machine's speed moves by 5-10% within minutes): with --host-speed probes, the speed
    probes headline.py runs before and after every point against the calibration run's probes
    (the same requests, one at a time); with --host-speed own-steps, the point's own engine steps
    against the calibrated model (their durations only, never the requests' latencies);
  - KV transfer: bytes per token ÷ link bandwidth + a fixed overhead, FIFO on the decode side;
  - KV capacity (1 GB of fp32 KV per instance in blocks of 16), max_num_seqs, the token budget.

The model lives in the planner (placement/calibrate.py, host_speed.py, fidelity.py, steps.py, with
their tests); this script only parses arguments and prints the table.

Usage:
  pdserve profile --model smollm2-135m -o results/profile-smollm2.json \\
      --max-batch-tokens 1024 --max-len 512 --repeats 2
  python benchmarks/fidelity.py --profile results/profile-smollm2.json results/headline \\
      -o results/headline/fidelity.md
  python benchmarks/headline.py -o results/calibration --seed 1 --rates 0.5 1.0   # another trace
  python benchmarks/fidelity.py --profile results/profile-smollm2.json --calibration results/calibration \\
      --host-speed probes results/headline
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.results import RunData
from pdserve.placement.calibrate import Setup, calibrate_in_situ, calibrate_unloaded
from pdserve.placement.fidelity import Model, compare, load_runs, markdown, pick_profile
from pdserve.placement.host_speed import own_speed_factors, speed_factors
from pdserve.placement.latency import PhaseProfile


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench results directories, or a directory of them")
    ap.add_argument("--profile", required=True, help="profile file from `pdserve profile`")
    ap.add_argument("--profile-model", default=None, help="model key in the profile (default: the SmolLM2 one)")
    ap.add_argument("--calibration", default=None,
                    help="a calibration run's results (headline.py on another --seed): fit each system's "
                         "profile, overheads and KV transfer to its own steps and requests there")
    ap.add_argument("--host-speed", choices=("fixed", "probes", "own-steps"), default="fixed",
                    help="with --calibration, probes: scale each point's steps by how much slower the host ran "
                         "around it than during the calibration run (both runs' probes.jsonl); own-steps: by how "
                         "much slower the point's own engine steps ran than the calibrated model says")
    ap.add_argument("--no-decode-shape", action="store_true",
                    help="with --calibration: past the largest decode batch the calibration ran, the linear "
                         "decode fit rather than the --profile's curve scaled to the calibration")
    ap.add_argument("--no-shared-host", action="store_true",
                    help="with --calibration: one profile for every step, alone on the host or not")
    ap.add_argument("--slo-file", default=None, help="slo.json with the unloaded latency (default: next to the runs)")
    ap.add_argument("--overheads", choices=("unloaded", "none", "manual"), default="unloaded",
                    help="unloaded: calibrate from slo.json; manual: --step-overhead-ms/--ttft-overhead-ms")
    ap.add_argument("--step-overhead-ms", type=float, default=0.0)
    ap.add_argument("--ttft-overhead-ms", type=float, default=0.0)
    ap.add_argument("--link-gbps", type=float, default=0.51,
                    help="KV transfer bandwidth, GB/s (default: a KV pull over gRPC here, BENCHMARKS.md §5)")
    ap.add_argument("--transfer-overhead-ms", type=float, default=2.0)
    ap.add_argument("--chunk-tokens", type=int, default=32)
    ap.add_argument("--colocated-instances", type=int, default=2)
    ap.add_argument("--jitter-ms", type=float, default=0.0,
                    help="also simulate each trace with every send time moved by up to ± this much (uniform)")
    ap.add_argument("--jitter-runs", type=int, default=20)
    ap.add_argument("--sensitivity", type=float, default=0.0,
                    help="also simulate with every step (1 ∓ this)× as long, e.g. 0.05")
    ap.add_argument("-o", "--output", default=None, help="also write the markdown table here")
    return ap


def models(args: argparse.Namespace, runs: dict[str, RunData], profile: PhaseProfile, base: Setup,
           notes: list[str]) -> dict[str, Model]:
    """Each system's calibrated (profile, setup), as the flags ask; appends what was done to `notes`."""
    if args.calibration:
        per_system = {}
        for label in runs:
            prof, setup, note = calibrate_in_situ(Path(args.calibration) / label, base, not args.no_shared_host,
                                                  None if args.no_decode_shape else profile)
            per_system[label] = (prof, setup)
            notes.append(note)
        return per_system
    calibrated = base
    if args.overheads == "manual":
        calibrated = dataclasses.replace(base, step_overhead_s=args.step_overhead_ms * 1e-3,
                                         ttft_overhead_s=args.ttft_overhead_ms * 1e-3)
        notes.append(f"overheads set by hand: step {args.step_overhead_ms} ms, TTFT {args.ttft_overhead_ms} ms")
    elif args.overheads == "unloaded":
        first = next(iter(runs.values())).path
        slo_file = Path(args.slo_file) if args.slo_file else first.parent / "slo.json"
        if slo_file.is_file():
            calibrated, note = calibrate_unloaded(slo_file, runs, profile, base)
            notes.append(note)
        else:
            print(f"no {slo_file}: no overheads calibrated", file=sys.stderr)
    return {label: (profile, calibrated) for label in runs}


def speeds(args: argparse.Namespace, runs: dict[str, RunData], per_system: dict[str, Model],
           notes: list[str]) -> dict[str, dict[float, float]] | None:
    """Per system and rate, the host's speed factor (--host-speed), or None for a fixed host."""
    if args.host_speed == "probes":
        notes.append("host speed from the probes before and after each point ÷ the calibration run's probes")
        return {label: speed_factors(run, Path(args.calibration) / label, per_system[label][0])
                for label, run in runs.items()}
    if args.host_speed == "own-steps":
        notes.append("host speed from each point's own engine steps (their durations against the calibrated model)")
        return {label: own_speed_factors(run, per_system[label][0], per_system[label][1].host_slowdown)
                for label, run in runs.items()}
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.host_speed != "fixed" and not args.calibration:
        ap.error(f"--host-speed {args.host_speed} needs --calibration")
    runs = load_runs(args.results)
    profile = pick_profile(args.profile, args.profile_model)
    base = Setup(link_bytes_per_s=args.link_gbps * 1e9, transfer_overhead_s=args.transfer_overhead_ms * 1e-3,
                 chunk_tokens=args.chunk_tokens, colocated_instances=args.colocated_instances)
    notes = [f"profile {args.profile}: prefill a={profile.prefill.a * 1e3:.2f} ms b={profile.prefill.b * 1e3:.4f} ms/token, "
             f"decode a={profile.decode_small.a * 1e3:.2f} ms b={profile.decode_small.b * 1e6:.2f} µs/ctx-token "
             f"c={profile.decode_small.c * 1e3:.3f} ms/seq"]
    per_system = models(args, runs, profile, base, notes)
    rows = compare(runs, (profile, base), per_system, args.jitter_ms * 1e-3, args.jitter_runs, args.sensitivity,
                   speeds(args, runs, per_system, notes))
    text = markdown(rows, notes, args.jitter_ms, args.sensitivity)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        sys.exit(f"fidelity: {e}")
