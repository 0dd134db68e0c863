"""The planner's predicted ranking of the multi-turn headline's five systems on this machine (issue 16).

Builds the headline's session trace the way benchmarks/multiturn.py does (ShareGPT sessions,
bench.sessions, same caps and think time) as a lengths file with session fields, or takes the
headline run's own (`--workload results/multiturn/sessions.jsonl`); derives the SLOs the way the
headline does (TTFT 4×, TPOT 2× the median unloaded latency of system (a)) from the simulator at
a near-zero rate; then runs the exact `pdserve plan --compare-modes` command it prints:
SmolLM2-135M on 1 node × 2 "GPUs" (two CPU cores, one engine each), this machine's profile
(benchmarks/profiles/, `pdserve profile --quick`), KV pool 0.5 GB per engine (11,648 tokens,
the headline's `kv_cache_memory_gb`), chunks of 32 tokens (the headline's CHUNK_TOKENS).

  python benchmarks/planner_multiturn.py [--workload FILE] [-o results/planner-multiturn]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from pdserve.bench.lengths import RequestLengths, write_lengths
from pdserve.config import SLOConfig
from pdserve.placement.candidates import PhaseConfig, Unit
from pdserve.placement.hardware import ClusterSpec, load_gpu
from pdserve.placement.model_spec import load_model
from pdserve.placement.profile_file import load_profile
from pdserve.placement.search import SearchSpec, deployment_of
from pdserve.placement.simulator import simulate
from pdserve.placement.workload import load_lengths

PROFILE = str(Path(__file__).parent / "profiles" / "smollm2-cpu-quick.json")
KV_TOKENS = 11_648  # 0.5 GB / 46,080 B per SmolLM2 token (fp32), whole 16-token blocks
CHUNK = 32


def session_lengths(path: Path, num_sessions: int, think_time_s: float) -> Path:
    """The headline's sessions (benchmarks/multiturn.py's defaults) as a lengths file."""
    from pdserve.bench.sessions import SessionSpec, build_sessions
    from pdserve.bench.tokenizer import load_tokenizer

    spec = SessionSpec(num_sessions=num_sessions, max_turns=4, max_context_len=1024, max_user_len=128, max_output_len=48)
    items = [RequestLengths(s.prompt_len(k), t.output_len, session=i, turn=k, shared_prefix_len=0,
                            think_time_s=think_time_s if k else 0.0)
             for i, s in enumerate(build_sessions(spec, load_tokenizer("smollm2-135m"))) for k, t in enumerate(s.turns)]
    write_lengths(path, items)
    return path


def unloaded_slo(workload_path: Path) -> SLOConfig:
    """4× / 2× the median TTFT / TPOT of system (a) with one session at a time (rate → 0)."""
    gpu = load_gpu("cpu")
    spec = SearchSpec(model=load_model("smollm2-135m"), cluster=ClusterSpec(num_nodes=1, gpus_per_node=2, gpu=gpu),
                      source=load_profile(PROFILE), workload=load_lengths(workload_path), slo=SLOConfig(),
                      decode_token_limit=KV_TOKENS)
    dep = deployment_of(spec, Unit(algorithm="high-affinity", prefill=PhaseConfig(1, 1), decode=PhaseConfig(1, 1),
                                  num_decode=1))
    res = simulate(dep, spec.workload.trace(200, seed=0), 0.001)
    return SLOConfig(ttft_s=round(4 * statistics.median(res.ttft_s), 3),
                     tpot_s=round(2 * statistics.median(t for t in res.tpot_s if t > 0), 4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default=None, help="a session lengths file (default: build the headline's)")
    ap.add_argument("-o", "--output", default="results/planner-multiturn")
    ap.add_argument("--sessions", type=int, default=200, help="sessions to build (the planner resamples them)")
    ap.add_argument("--think-time", type=float, default=1.0)
    ap.add_argument("--num-requests", type=int, default=1000)
    a = ap.parse_args()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    workload = Path(a.workload) if a.workload else session_lengths(out / "sessions.jsonl", a.sessions, a.think_time)
    slo = unloaded_slo(workload)
    cmd = ["pdserve", "plan", "--model", "smollm2-135m", "--profile", PROFILE, "--nodes", "1", "--gpus-per-node", "2",
           "--workload", str(workload), "--ttft", f"{slo.ttft_s}", "--tpot", f"{slo.tpot_s}",
           "--decode-token-limit", str(KV_TOKENS), "--chunk-size", str(CHUNK), "--num-requests", str(a.num_requests),
           "--compare-modes", "--json", str(out / "modes.json"), "-o", str(out / "serving.yaml")]
    print("$ " + shlex.join(cmd), flush=True)
    exe = shutil.which("pdserve") or str(Path(sys.executable).parent / "pdserve")  # the venv's, when not activated
    subprocess.run([exe, *cmd[1:]], check=True)
    report = json.loads((out / "modes.json").read_text())
    print(json.dumps({"threshold": report["threshold"], "winner": report["winner"],
                      "gain_over_a": round(report["gain_over_a"], 3)}))


if __name__ == "__main__":
    main()
