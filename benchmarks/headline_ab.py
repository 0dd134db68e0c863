"""The headline deployment's per-core goodput on two commits of pdserve, side by side in one run.

Each commit is extracted (`git archive`) and put on PYTHONPATH as the `pdserve` package (its
pyproject's package-dir mapping rebuilt with symlinks). Its own benchmarks/headline.py then runs
one rate point at a time, the two commits alternating which goes first (A B, B A, A B, ...), so a
change in a shared machine's load falls on both. Every point uses the same trace (--seed, the
same ShareGPT requests and Poisson arrivals), the same rates and the same SLOs: written into each
point's slo.json before it runs (headline.py then measures none), by default §2's headline SLOs
(4 x 823 ms TTFT, 2 x 53.55 ms TPOT, for 90% of requests). Per-core goodput is read off each
commit's attainment curve at 90% (linear interpolation, bench/goodput.py), at 1x and at looser
SLOs (`--slo-scales`, re-read from the same per-request records).

Usage: python benchmarks/headline_ab.py --commits 115eea3 HEAD -o results/headline-ab \\
           [--system disaggregated] [--rates 0.15 0.3 0.5 0.8 1.2] [--num-requests 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from pdserve.bench.goodput import goodput_from_curve
from pdserve.bench.metrics import attainment
from pdserve.bench.results import read_results
from pdserve.config import SLOConfig

REPO = Path(__file__).resolve().parent.parent


def package_of(commit: str, work: Path) -> tuple[Path, Path]:
    """(tree, PYTHONPATH entry) for `commit`: the tree extracted, and a directory whose `pdserve`
    maps every package of the tree's pyproject package-dir to its folder."""
    tree, path = work / f"tree-{commit}", work / f"path-{commit}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    if not path.exists():
        mapping = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
        (path / "pdserve").mkdir(parents=True)
        for item in (tree / mapping["pdserve"]).iterdir():
            (path / "pdserve" / item.name).symlink_to(item)
        for name, folder in mapping.items():
            sub = name.removeprefix("pdserve.")
            if name != "pdserve" and not (path / "pdserve" / sub).exists():
                (path / "pdserve" / sub).symlink_to(tree / folder)
    return tree, path


def run_point(commit: str, rate: float, args: argparse.Namespace, work: Path) -> Path:
    """One rate point of `commit`'s headline.py at the shared SLOs; its results directory."""
    tree, path = package_of(commit, work)
    out = args.output / commit / f"rate-{rate:g}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "slo.json").write_text(json.dumps({"unloaded_ttft_s": args.unloaded_ttft, "unloaded_tpot_s":
                                              args.unloaded_tpot, "measured_on": "given (headline_ab.py)"}))
    cmd = [sys.executable, str(tree / "benchmarks" / "headline.py"), "-o", str(out), "--rates", str(rate),
           "--systems", args.system, "--num-requests", str(args.num_requests), "--seed", str(args.seed), "--no-probe"]
    env = {**os.environ, "PYTHONPATH": str(path), "RAY_AUTH_MODE": "disabled"}
    print(f"== {commit} at {rate:g} req/s", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=path)  # Ray workers put the cwd first on sys.path
    return out / args.system


def summarize(commit: str, dirs: list[Path], args: argparse.Namespace) -> dict:
    """Attainment per rate and per-core goodput at each SLO scale, from the points' records."""
    slo = SLOConfig(4 * args.unloaded_ttft, 2 * args.unloaded_tpot, 0.9)
    runs = [read_results(d) for d in dirs]
    records = {rate: recs for run in runs for rate, recs in run.records.items()}
    out: dict = {"points": [{"rate": p["rate"], "attainment": p["attainment"], "ttft_p90_s": p["ttft_s"].get("p90"),
                             "tpot_p90_s": p["tpot_s"].get("p90")} for run in runs for p in run.summary["points"]]}
    for scale in args.slo_scales:
        scaled = SLOConfig(slo.ttft_s * scale, slo.tpot_s * scale, slo.attainment)
        curve = [(rate, attainment(recs, scaled)) for rate, recs in sorted(records.items())]
        out[f"x{scale:g}"] = {"curve": curve, "goodput": goodput_from_curve(curve, 0.9, gpus=2.0).to_dict()}
    print(f"{commit}: " + "; ".join(f"x{s:g} per-core goodput {g['per_gpu']:.3f} ({g['bracket']})"
                                    for s in args.slo_scales if (g := out[f"x{s:g}"]["goodput"])), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", nargs=2, required=True, metavar=("A", "B"))
    ap.add_argument("-o", "--output", type=Path, default=Path("results/headline-ab"))
    ap.add_argument("--system", default="disaggregated")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.15, 0.3, 0.5, 0.8, 1.2])
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unloaded-ttft", type=float, default=0.823, help="s; the TTFT SLO is 4x this")
    ap.add_argument("--unloaded-tpot", type=float, default=0.05355, help="s; the TPOT SLO is 2x this")
    ap.add_argument("--slo-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    args = ap.parse_args()
    args.output = args.output.resolve()
    args.commits = [subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", c], check=True,
                                   capture_output=True, text=True).stdout.strip() for c in args.commits]
    work = args.output / "trees"
    dirs: dict[str, list[Path]] = {c: [] for c in args.commits}
    for i, rate in enumerate(args.rates):
        for commit in (args.commits if i % 2 == 0 else args.commits[::-1]):
            dirs[commit].append(run_point(commit, rate, args, work))
    summary = {c: summarize(c, d, args) for c, d in dirs.items()}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
