"""The planner's predicted ranking of the multi-turn headline's five systems on this machine (issue 16).

Builds the headline's session trace the way benchmarks/multiturn.py does (ShareGPT sessions,
bench.sessions, same caps and think time) as a lengths file with session fields, or takes the
headline run's own (`--workload results/multiturn/sessions.jsonl`); derives the SLOs the way the
headline does (TTFT 4×, TPOT 2× the median unloaded latency of system (a)) from the simulator at
a near-zero rate; then runs the exact `pdserve plan --compare-modes` command it prints:
SmolLM2-135M on 1 node × 2 "GPUs" (two CPU cores, one engine each), this machine's profile
(benchmarks/profiles/, `pdserve profile --quick`), KV pool 0.5 GB per engine (10,848 tokens,
the headline's `kv_cache_memory_gb`), chunks of 32 tokens (the headline's CHUNK_TOKENS).

  python benchmarks/planner_multiturn.py [--workload FILE] [-o results/planner-multiturn]
  python benchmarks/planner_multiturn.py --distserve-a100 -o results/planner-multiturn-a100
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
from pdserve.bench.sessions import ChatSession, SessionSpec
from pdserve.config import SLOConfig
from pdserve.placement.candidates import PhaseConfig, Unit
from pdserve.placement.hardware import ClusterSpec, load_gpu
from pdserve.placement.model_spec import load_model
from pdserve.placement.profile_file import load_profile
from pdserve.placement.search import SearchSpec, deployment_of
from pdserve.placement.simulator import simulate
from pdserve.placement.workload import load_lengths

PROFILE = str(Path(__file__).parent / "profiles" / "smollm2-cpu-quick.json")
KV_TOKENS = 10_848  # the engine's blocks in 0.5 GB (1e9 B): 500,000,000 // (16 × 46,080 B per SmolLM2 token, fp32) × 16
CHUNK = 32


def session_lengths(path: Path, spec: SessionSpec, think_time_s: float) -> Path:
    """ShareGPT sessions (bench.sessions, SmolLM2 tokens) as a lengths file; a system prompt and its
    template tokens are the shared prefix."""
    from pdserve.bench.sessions import TEMPLATE_TOKENS_PER_MESSAGE, build_sessions
    from pdserve.bench.tokenizer import load_tokenizer

    def shared(s: ChatSession) -> int:
        return s.system_len + TEMPLATE_TOKENS_PER_MESSAGE if s.system else 0

    items = [RequestLengths(s.prompt_len(k), t.output_len, session=i, turn=k, shared_prefix_len=shared(s),
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
    ap.add_argument("--distserve-a100", action="store_true", help="plan OPT-13B on DistServe's A100 profile instead")
    ap.add_argument("--a100-ttft", type=float, default=1.0, help="TTFT SLO of --distserve-a100, seconds")
    a = ap.parse_args()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    if a.distserve_a100:
        distserve_a100(out, a)
        return
    spec = SessionSpec(num_sessions=a.sessions, max_turns=4, max_context_len=1024, max_user_len=128, max_output_len=48)
    workload = Path(a.workload) if a.workload else session_lengths(out / "sessions.jsonl", spec, a.think_time)
    slo = unloaded_slo(workload)
    cmd = ["pdserve", "plan", "--model", "smollm2-135m", "--profile", PROFILE, "--nodes", "1", "--gpus-per-node", "2",
           "--workload", str(workload), "--ttft", f"{slo.ttft_s}", "--tpot", f"{slo.tpot_s}",
           "--decode-token-limit", str(KV_TOKENS), "--chunk-size", str(CHUNK), "--num-requests", str(a.num_requests),
           "--compare-modes", "--json", str(out / "modes.json"), "-o", str(out / "serving.yaml")]
    report = run(cmd, out)
    print(json.dumps({"threshold": report["threshold"], "winner": report["winner"], "gain_over_a": report["gain_over_a"]}))


def run(cmd: list[str], out: Path) -> dict:
    print("$ " + shlex.join(cmd), flush=True)
    exe = shutil.which("pdserve") or str(Path(sys.executable).parent / "pdserve")  # the venv's, when not activated
    subprocess.run([exe, *cmd[1:]], check=True)
    return json.loads((out / "modes.json").read_text())


def distserve_a100(out: Path, a: argparse.Namespace) -> None:
    """OPT-13B on DistServe's published A100 profile, 1 node × 4 GPUs, ShareGPT sessions behind a
    1,024-token system prompt; DistServe's chatbot TPOT SLO (0.1 s) and `--a100-ttft` (DistServe's
    0.25 s is for single-turn prompts; a session's prompt grows to 2k tokens)."""
    spec = SessionSpec(name="system-prompt", num_sessions=a.sessions, max_turns=6, max_context_len=2048,
                       max_user_len=256, max_output_len=256, system_prompt_len=1024)
    workload = session_lengths(out / "sessions-a100.jsonl", spec, a.think_time)
    run(["pdserve", "plan", "--model", "opt-13b", "--profile", "distserve-a100", "--gpu", "a100-80g", "--nodes", "1",
         "--gpus-per-node", "4", "--workload", str(workload), "--ttft", str(a.a100_ttft), "--tpot", "0.1",
         "--num-requests", str(a.num_requests), "--compare-modes", "--json", str(out / "modes.json"),
         "-o", str(out / "serving-a100.yaml")], out)


if __name__ == "__main__":
    main()
