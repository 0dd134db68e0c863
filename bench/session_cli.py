"""`pdserve bench --sessions ...`: the multi-turn options of `pdserve bench` and `pdserve bench lengths`.

  pdserve bench --url URL --sessions sharegpt -n 20 --max-turns 4 --think-time 1 --rate 0.1 0.2 --ttft 4s --tpot 100ms
  pdserve bench lengths --sessions system-prompt --system-prompt-len 512 -n 50 -o sessions.jsonl

With `--sessions`, `-n` counts sessions, `--rate` is in new sessions per second, `--max-output-len`
caps each answer and the endpoint is the chat one.
"""

from __future__ import annotations

import argparse

from pdserve.bench.sessions import SESSION_WORKLOADS, SessionSpec
from pdserve.config import SLOConfig

CHAT_PATH = "/v1/chat/completions"


def add_session_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-turn sessions (bench.sessions)")
    g.add_argument("--sessions", choices=SESSION_WORKLOADS, default=None,
                   help="replay multi-turn chat sessions instead of single requests: ShareGPT conversations, "
                        "or the same behind one long shared system prompt")
    g.add_argument("--max-turns", type=int, default=4, help="turns per session at most (default 4)")
    g.add_argument("--max-context-len", type=int, default=1024,
                   help="every turn's prompt + answer stays below this many tokens (default 1024)")
    g.add_argument("--max-user-len", type=int, default=256, help="user messages are cut to this many tokens")
    g.add_argument("--system-prompt-len", type=int, default=512,
                   help="tokens of the shared system prompt of `--sessions system-prompt` (default 512)")
    g.add_argument("--think-time", type=float, default=1.0,
                   help="seconds from the end of an answer to the next turn of the session (default 1)")


def session_spec(args: argparse.Namespace) -> SessionSpec:
    return SessionSpec(name=args.sessions, num_sessions=args.num_requests, max_turns=args.max_turns,
                       max_context_len=args.max_context_len, max_user_len=args.max_user_len,
                       max_output_len=args.max_output_len or 128,
                       system_prompt_len=args.system_prompt_len if args.sessions == "system-prompt" else 0,
                       seed=args.seed)


def build(args: argparse.Namespace, tokenizer_name: str):
    """(sessions, workload metadata) for `args`."""
    from dataclasses import asdict

    from pdserve.bench.sessions import build_sessions
    from pdserve.bench.tokenizer import load_tokenizer

    spec = session_spec(args)
    return build_sessions(spec, load_tokenizer(tokenizer_name)), {**asdict(spec), "tokenizer": tokenizer_name}


def run(args: argparse.Namespace, endpoint, gpus: float, cv: float, tokenizer_name: str) -> int:
    """The session benchmark of `pdserve bench --sessions`: `endpoint` is the chat endpoint."""
    from pdserve.bench.cli import slo_from_args
    from pdserve.bench.quick import median_latency
    from pdserve.bench.session_bench import (SessionBenchConfig, run_session_rates, save_sessions,
                                             unloaded_session_records)
    from pdserve.bench.session_load import SessionLoadConfig

    if not args.rate:
        raise ValueError("--rate: --sessions needs the session rates to measure (sessions/s)")
    if args.max_concurrency is not None:
        raise ValueError("--max-concurrency: sessions are closed-loop within a session; use --rate and --think-time")
    sessions, meta = build(args, tokenizer_name)
    if args.slo_from_unloaded:
        ttft, tpot = median_latency(unloaded_session_records(endpoint, sessions, timeout_s=args.timeout))
        slo = SLOConfig(ttft * args.slo_from_unloaded[0], tpot * args.slo_from_unloaded[1], args.attainment)
        print(f"SLOs from unloaded latency (every turn of 3 sessions, one at a time): "
              f"TTFT {slo.ttft_s * 1e3:.1f} ms, TPOT {slo.tpot_s * 1e3:.1f} ms")
    else:
        slo = slo_from_args(args)
    load = SessionLoadConfig(rate=1.0, think_time_s=args.think_time, cv=cv,
                             seed=args.seed, timeout_s=args.timeout)
    cfg = SessionBenchConfig(endpoint, slo, gpus, load, args.warmup, args.label)
    num_turns = sum(len(s.turns) for s in sessions)
    print(f"{len(sessions)} sessions ({num_turns} turns) at {len(args.rate)} session rates")
    result = run_session_rates(cfg, sessions, args.rate)
    if args.output_dir is not None:
        print(f"results in {save_sessions(result, args.output_dir, sessions, meta)}")
    print(result.table())
    return 0


def write_trace(args: argparse.Namespace, tokenizer_name: str) -> int:
    """`pdserve bench lengths --sessions ...`: the sessions as a lengths file with session fields."""
    from pdserve.bench.session_trace import write_session_trace

    sessions, _ = build(args, tokenizer_name)
    n = write_session_trace(args.output, sessions, args.think_time)
    print(f"wrote {len(sessions)} sessions ({n} turns) to {args.output}")
    return 0
