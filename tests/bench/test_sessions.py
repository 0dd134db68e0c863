"""Multi-turn sessions from the real ShareGPT data: turn structure, context caps, the shared system prompt."""

from __future__ import annotations

import asyncio
import time

from pathlib import Path

import pytest

from pdserve.bench.echo_server import EchoConfig
from pdserve.bench.sessions import TEMPLATE_TOKENS_PER_MESSAGE, ChatSession, SessionSpec, SessionTurn, build_sessions
from pdserve.bench.client import Endpoint
from pdserve.bench.session_load import SessionLoadConfig, run_sessions
from pdserve.bench.turn_stats import turn_stats
from pdserve.bench.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


def test_sharegpt_sessions_are_real_multi_turn_and_fit_the_context(tok) -> None:
    spec = SessionSpec(num_sessions=12, max_turns=4, max_context_len=600, max_user_len=120, max_output_len=64)
    sessions = build_sessions(spec, tok)
    assert len(sessions) == 12 and sessions == build_sessions(spec, tok)  # deterministic
    assert any(len(s.turns) > 2 for s in sessions)
    for s in sessions:
        assert 2 <= len(s.turns) <= 4 and not s.system
        for k, turn in enumerate(s.turns):
            assert 1 <= turn.user_len <= 120 and 1 <= turn.output_len <= 64
            assert len(tok.encode(turn.user)) == pytest.approx(turn.user_len, abs=2)
            assert s.prompt_len(k) + turn.output_len < 600
            if k:  # each turn's prompt grows by the last answer and the new message only
                assert s.new_len(k) == turn.user_len + 2 * TEMPLATE_TOKENS_PER_MESSAGE


def test_system_prompt_sessions_share_one_long_prefix(tok) -> None:
    spec = SessionSpec(name="system-prompt", num_sessions=5, system_prompt_len=300, max_context_len=900)
    sessions = build_sessions(spec, tok)
    assert len({s.system for s in sessions}) == 1
    assert sessions[0].system_len == pytest.approx(300, abs=3)
    assert sessions[0].prompt_len(0) > 300


def test_prompt_len_counts_history_answers_and_template() -> None:
    s = ChatSession((SessionTurn("a", 10, 5), SessionTurn("b", 7, 3)), system="sys", system_len=20)
    t = TEMPLATE_TOKENS_PER_MESSAGE
    assert s.prompt_len(0) == 20 + 10 + 2 * t
    assert s.prompt_len(1) == 20 + 10 + 5 + 7 + 4 * t
    assert s.new_len(0) == s.prompt_len(0) and s.new_len(1) == 7 + 2 * t


@pytest.mark.parametrize("kw, field", [({"name": "chat"}, "sessions"), ({"max_turns": 0}, "max_turns"),
                                       ({"system_prompt_len": 10}, "system_prompt_len"),
                                       ({"name": "system-prompt"}, "system_prompt_len")])
def test_bad_specs_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SessionSpec(**kw)


def test_replay_sends_each_turn_with_the_real_history_after_the_answer(fake_server) -> None:
    sessions = [ChatSession((SessionTurn("hi", 1, 3), SessionTurn("more", 1, 2), SessionTurn("end", 1, 2)), "be brief", 2),
                ChatSession((SessionTurn("q1", 1, 2), SessionTurn("q2", 1, 4)))]
    endpoint = Endpoint(fake_server.url, "/v1/chat/completions")
    t = time.perf_counter()
    records = asyncio.run(run_sessions(endpoint, sessions, SessionLoadConfig(rate=100.0, think_time_s=0.05)))
    assert time.perf_counter() - t >= 2 * 0.05  # the first session's two think times
    assert [(r.session, r.turn, r.ok, r.num_output_tokens) for r in records] == [
        (0, 0, True, 3), (0, 1, True, 2), (0, 2, True, 2), (1, 0, True, 2), (1, 1, True, 4)]
    by_first = {b["messages"][-1]["content"]: b["messages"] for b in fake_server.config.seen}
    assert by_first["end"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": " t0 t1 t2"}, {"role": "user", "content": "more"},
                               {"role": "assistant", "content": " t0 t1"}, {"role": "user", "content": "end"}]
    stats = turn_stats(records)
    assert [(s.turn, s.num, s.ok) for s in stats] == [(0, 2, 2), (1, 2, 2), (2, 1, 1)]
    assert stats[0].cached_fraction == 0.0  # a breakdown without `cached_tokens`: no prefix-cache hits
    records[0].server_timings = {}  # a server that sends no breakdown at all: unknown, not 0
    records[3].server_timings = {}
    assert turn_stats(records)[0].cached_fraction is None


@pytest.mark.parametrize("fake_server", [EchoConfig(fail_every=2)], indirect=True)
def test_a_failed_turn_ends_its_session(fake_server) -> None:
    session = ChatSession((SessionTurn("a", 1, 2), SessionTurn("b", 1, 2), SessionTurn("c", 1, 2)))
    records = asyncio.run(run_sessions(Endpoint(fake_server.url, "/v1/chat/completions"), [session],
                                       SessionLoadConfig(rate=10.0, think_time_s=0.0)))
    assert [r.ok for r in records] == [True, False, False]
    assert "HTTP 500" in records[1].error and records[2].error is None and len(fake_server.config.seen) == 2
