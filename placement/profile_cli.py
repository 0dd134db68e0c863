"""`pdserve profile`: measure the engine on this machine (or fit the steps a deployment ran) and
write a latency profile the planner reads (`pdserve plan --profile FILE`)."""

from __future__ import annotations

import argparse
import collections
import sys
import time

from pdserve.placement.latency import PhaseProfile
from pdserve.placement.model_spec import load_model
from pdserve.placement.profile_file import load_profile


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    f = subparsers.add_parser(
        "profile", help="measure the engine on this machine and fit a latency profile",
        description="Measure prefill and decode steps of the engine over a grid and fit the planner's latency "
                    "model (placement/latency.py). --quick measures a coarse grid (minutes instead of ~15 on a "
                    "2-core CPU). --from-steps fits the steps a running deployment logged instead: serve with "
                    "step logging (benchmarks/headline.py writes steps.jsonl next to its results: one JSON line "
                    "per engine step with worker, start_s, duration_s and the new/cached tokens of each sequence).")
    f.add_argument("--model", default="smollm2-135m", help="model to measure: pdserve name or HF directory (default: %(default)s)")
    f.add_argument("-o", "--output", default="profile.json", help="profile file to write (default: %(default)s)")
    f.add_argument("--quick", action="store_true", help="a coarse grid: fewer batch sizes and lengths")
    f.add_argument("--max-batch-tokens", type=int, default=2048, help="largest prefill batch measured, tokens (default: %(default)s)")
    f.add_argument("--max-len", type=int, default=1024, help="longest prompt or context measured, tokens (default: %(default)s)")
    f.add_argument("--max-decode-tokens", type=int, default=16384,
                   help="largest decode batch measured, context tokens summed over the batch (default: %(default)s)")
    f.add_argument("--repeats", type=int, default=3, help="timed runs per grid point; the median counts (default: %(default)s)")
    f.add_argument("--from-steps", nargs="+", default=None, metavar="STEPS_JSONL",
                   help="fit an in-situ profile to step logs of a serving deployment (steps.jsonl, as "
                        "benchmarks/headline.py saves them) instead of measuring the engine alone")
    f.add_argument("--decode-shape", default=None, metavar="PROFILE",
                   help="with --from-steps: a grid profile (pdserve profile) whose decode curve, scaled, continues "
                        "the in-situ one past the largest batch the steps ran")
    f.set_defaults(func=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    from pdserve.placement.profile import Grid, fit_and_write, measure_engine

    if args.from_steps:
        return _profile_from_steps(args)
    grid = (Grid.quick if args.quick else Grid)(max_batch_tokens=args.max_batch_tokens, max_len=args.max_len,
                                                max_decode_tokens=args.max_decode_tokens)
    print(f"profiling {args.model} over {len(grid.points())} prefill and {len(grid.decode_points())} decode points "
          f"× {args.repeats} repeats", file=sys.stderr)
    pre, dec, device = measure_engine(args.model, grid, args.repeats, progress=Eta(grid.costs()))
    key = _profile_key(args.model)
    _, report = fit_and_write(args.output, key, 1, pre, dec, device=device)
    return _report_profile(args.output, key, report)


class Eta:
    """Progress lines with an estimate of the time left: the grid's points cost unequal time
    (cheapest first), so the estimate scales elapsed time by the share of the grid's cost done."""

    def __init__(self, costs: list[float]) -> None:
        self.costs, self.total, self.started = costs, sum(costs), time.monotonic()

    def __call__(self, i: int, n: int) -> None:
        done = sum(self.costs[:i])
        elapsed = time.monotonic() - self.started
        left = elapsed * (self.total - done) / done if done else float("nan")
        print(f"  [{i}/{n}] {elapsed:.0f}s elapsed, ~{left:.0f}s left (estimate)", file=sys.stderr)


def _profile_from_steps(args: argparse.Namespace) -> int:
    from pdserve.placement.fit import extend_decode, fit_steps
    from pdserve.placement.profile import write_profile
    from pdserve.placement.steps import read_step_log, step_kind

    steps = [s for path in args.from_steps for log in read_step_log(path).values() for s in log]
    kinds = collections.Counter(step_kind(s) for s in steps)
    print(f"{len(steps)} steps: {kinds['prefill']} prefill, {kinds['decode']} decode, {kinds['mixed']} mixed",
          file=sys.stderr)
    profile, report = fit_steps(steps)
    key = _profile_key(args.model)
    if args.decode_shape:
        profile = extend_decode(profile, _tp1_profile(args.decode_shape, key))
    write_profile(args.output, key, 1, profile)
    return _report_profile(args.output, key, report)


def _tp1_profile(path: str, key: str) -> PhaseProfile:
    table = load_profile(path).table
    if 1 not in table.get(key, {}):
        raise ValueError(f"--decode-shape {path}: no tp=1 entry for {key!r} (models: {', '.join(table)})")
    return table[key][1]


def _profile_key(model: str) -> str:
    try:
        return load_model(model).hf_name or model
    except ValueError:
        return model


def _report_profile(output: str, key: str, report: dict) -> int:
    for name, r in report.items():
        print(f"{name}: max rel error {r.max_rel_error:.1%}, mean {r.mean_rel_error:.1%}"
              + ("  (above 15%: the model's form misses this machine's shape; more --repeats or a quieter "
                 "machine may help, and the measured curves are kept either way)" if r.max_rel_error > 0.15 else ""))
    print(f"wrote {output} ({key}, tp=1)")
    return 0
