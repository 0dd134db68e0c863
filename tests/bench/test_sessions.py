"""Multi-turn sessions from the real ShareGPT data: turn structure, context caps, the shared system prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.bench.sessions import TEMPLATE_TOKENS_PER_MESSAGE, ChatSession, SessionSpec, SessionTurn, build_sessions
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
