"""Multi-turn benchmark runs against a real HTTP server that plays a prefix cache (bench.echo_server):
per-turn TTFT, prefix-hit shares, salting between rate points, results and the session trace."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pdserve.bench.cli import add_parsers
from pdserve.bench.client import Endpoint
from pdserve.bench.echo_server import EchoConfig
from pdserve.bench.results import read_results
from pdserve.bench.session_bench import SessionBenchConfig, run_session_rates, save_sessions
from pdserve.bench.session_load import SessionLoadConfig
from pdserve.bench.lengths import read_lengths
from pdserve.bench.session_trace import session_trace, write_session_trace
from pdserve.bench.sessions import TEMPLATE_TOKENS_PER_MESSAGE, ChatSession, SessionTurn
from pdserve.config import SLOConfig

CACHING = EchoConfig(prefill_s=0.005, token_gap_s=0.001, prefix_cache=True)
SESSIONS = [ChatSession((SessionTurn("a b c", 3, 3), SessionTurn("d e", 2, 2), SessionTurn("f", 1, 2))),
            ChatSession((SessionTurn("g h", 2, 2), SessionTurn("i", 1, 3)))]


def bench(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pdserve")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


@pytest.mark.parametrize("fake_server", [CACHING], indirect=True)
def test_prefix_hits_per_turn_and_no_reuse_across_rate_points(fake_server, tmp_path: Path) -> None:
    cfg = SessionBenchConfig(Endpoint(fake_server.url, "/v1/chat/completions"), SLOConfig(1.0, 1.0), gpus=2.0,
                             load=SessionLoadConfig(rate=1.0, think_time_s=0.0), warmup=1, label="fake")
    result = run_session_rates(cfg, SESSIONS, [50.0, 20.0], log=lambda _: None)
    assert [p.summary.rate for p in result.points] == [20.0, 50.0]
    # Words are the fake's tokens; every prompt starts with its point's salt "[N]" (1 word), which the
    # second session to arrive finds cached (1 of 4 + 3 first-turn words), and nothing of the last point.
    # Session 0: turn 2 = 4 + 3 answer + 2 = 9 words, 7 cached; turn 3 = 9 + 2 + 1 = 12, 11 cached.
    # Session 1: turn 2 = 3 + 2 + 1 = 6 words, 5 cached.
    for p in result.points:
        first, later = p.groups
        assert (first.num, first.ok, later.num, later.ok) == (2, 2, 3, 3)
        assert first.cached_fraction == pytest.approx(1 / 7) and first.prompt_tokens_mean == 3.5
        assert later.cached_fraction == pytest.approx((7 + 11 + 5) / (9 + 12 + 6))
        assert later.pull_skipped_fraction == 0.0  # reported breakdowns without the key count 0
        assert [(t.label, t.num) for t in p.turns] == [("1", 2), ("2", 2), ("3", 1)]
        assert p.turns[2].cached_fraction == pytest.approx(11 / 12)
        assert p.summary.num_requests == 5 and p.summary.attainment == 1.0
        # the mean over every turn that carried a breakdown, a turn without hits counting 0
        assert p.summary.server_timings_mean["cached_tokens"] == pytest.approx((1 + 7 + 11 + 5) / 5)
    assert result.turns_per_session == 2.5 and result.goodput.bracket == "above_range"
    assert result.goodput.per_gpu == 25.0
    assert "sessions/s" in result.table() and "t2+ p50" in result.table()
    # warm-up: one first turn, salted, 4 tokens at most; then 2 points x 5 turns
    assert len(fake_server.config.seen) == 1 + 10
    assert fake_server.config.seen[0]["max_tokens"] == 3 and fake_server.config.seen[0]["messages"][0][
        "content"].startswith("Warm-up.")

    out = save_sessions(result, tmp_path / "run", SESSIONS, {"name": "handmade"})
    run = read_results(out)
    assert run.summary["kind"] == "sessions" and run.summary["rate_unit"] == "sessions/s"
    assert run.summary["workload"]["num_turns"] == 5
    groups = run.summary["points"][0]["first_and_later"]
    assert [g["turns"] for g in groups] == ["1", "2+"] and groups[1]["cached_fraction"] == pytest.approx(23 / 27)
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert [(r["session"], r["turn"]) for r in rows[:5]] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert rows[1]["num_prompt_tokens"] == 9
    assert read_lengths(out / "lengths.jsonl") == session_trace(SESSIONS)


def test_session_trace_is_a_lengths_file_the_planner_reads(tmp_path: Path) -> None:
    t = TEMPLATE_TOKENS_PER_MESSAGE
    with_system = ChatSession((SessionTurn("a", 10, 5), SessionTurn("b", 7, 3)), system="sys", system_len=20)
    path = tmp_path / "trace.jsonl"
    assert write_session_trace(path, [SESSIONS[1], with_system], think_time_s=1.5) == 4
    trace = read_lengths(path)  # the one reader validates turn order and history growth
    assert trace == session_trace([SESSIONS[1], with_system], think_time_s=1.5)
    assert [(x.session, x.turn, x.think_time_s) for x in trace] == [(0, 0, 0.0), (0, 1, 1.5), (1, 0, 0.0), (1, 1, 1.5)]
    assert (trace[0].prompt_len, trace[0].output_len, trace[0].shared_prefix_len) == (2 + t, 2, 0)
    # a later turn's prompt is the previous prompt and answer, the new message and its template tokens
    assert trace[1].prompt_len == trace[0].prompt_len + 2 + 1 + 2 * t
    # the system prompt (with its template tokens) is the prefix shared across sessions, on every turn
    assert [x.shared_prefix_len for x in trace[2:]] == [20 + t, 20 + t] and trace[2].prompt_len == 30 + 2 * t
    assert trace[3].prompt_len == trace[2].prompt_len + 5 + 7 + 2 * t


@pytest.mark.parametrize("fake_server", [CACHING], indirect=True)
def test_bench_sessions_cli(fake_server, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    assert bench("--url", fake_server.url, "--tokenizer", str(tokenizer_dir), "--sessions", "sharegpt", "-n", "3",
                 "--max-turns", "3", "--max-output-len", "4", "--max-context-len", "400", "--think-time", "0",
                 "--rate", "100", "--ttft", "1s", "--tpot", "1s", "--no-progress", "-o", str(out)) == 0
    run = read_results(out)
    point = run.summary["points"][0]
    assert run.summary["workload"]["num_sessions"] == 3 and point["num_failed"] == 0
    assert point["num_requests"] == run.summary["workload"]["num_turns"] >= 6
    assert point["first_and_later"][1]["cached_fraction"] > 0.4  # the history is much of a later prompt
    assert all(body["messages"][0]["role"] == "user" for body in fake_server.config.seen)  # the chat endpoint
    trace = tmp_path / "trace.jsonl"
    assert bench("lengths", "--tokenizer", str(tokenizer_dir), "--sessions", "sharegpt", "-n", "3",
                 "--max-turns", "3", "--max-output-len", "4", "--max-context-len", "400", "--think-time", "0",
                 "-o", str(trace)) == 0
    assert trace.read_text() == (out / "lengths.jsonl").read_text()  # the same sessions, the same trace


def test_bench_sessions_needs_rates(fake_server, tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match="--rate"):
        bench("--url", fake_server.url, "--tokenizer", str(tokenizer_dir), "--sessions", "sharegpt", "-n", "2")
