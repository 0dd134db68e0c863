"""Session fields of the lengths file: round trip, old files still valid, errors naming the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.bench.lengths import RequestLengths, read_lengths, write_lengths


def _session_items() -> list[RequestLengths]:
    return [RequestLengths(300, 20, session="a", turn=0, shared_prefix_len=256),
            RequestLengths(40, 5),
            RequestLengths(350, 10, session=7, turn=0, shared_prefix_len=256, think_time_s=1.0),
            RequestLengths(340, 8, session="a", turn=1, shared_prefix_len=256, think_time_s=2.5),
            RequestLengths(380, 8, session=7, turn=1, shared_prefix_len=256)]


def test_sessions_round_trip_through_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    assert write_lengths(path, _session_items()) == 5
    back = read_lengths(path)
    assert back == _session_items()
    assert back[3].session == "a" and back[3].turn == 1 and back[3].think_time_s == 2.5
    assert back[2].session == 7  # an integer id stays an integer
    assert '"session"' not in path.read_text().splitlines()[1]  # single-turn lines stay as before


def test_old_files_stay_valid(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    path.write_text('{"prompt_len": 5, "output_len": 2, "note": "x"}\n{"prompt_len": "9", "output_len": 1}\n')
    assert read_lengths(path) == [RequestLengths(5, 2), RequestLengths(9, 1)]
    assert read_lengths(path)[0].session is None and read_lengths(path)[0].shared_prefix_len == 0


def test_sessions_in_csv_with_empty_cells(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("prompt_len,output_len,session,turn,shared_prefix_len,think_time_s\n"
                    "10,4,s1,0,,\n7,3,,,,\n20,2,s1,1,,0.5\n")
    assert read_lengths(path) == [RequestLengths(10, 4, session="s1", turn=0), RequestLengths(7, 3),
                                  RequestLengths(20, 2, session="s1", turn=1, think_time_s=0.5)]


@pytest.mark.parametrize("lines, match", [
    (['{"prompt_len": 10, "output_len": 4, "session": "a", "turn": 1}'], r":1: session 'a' turn 1: want turn 0"),
    (['{"prompt_len": 10, "output_len": 4, "session": "a", "turn": 0}',
      '{"prompt_len": 10, "output_len": 4, "session": "a", "turn": 2}'], r":2: .*want turn 1"),
    (['{"prompt_len": 10, "output_len": 4, "session": "a", "turn": 0}',
      '{"prompt_len": 13, "output_len": 4, "session": "a", "turn": 1}'], r":2: .*prompt_len 13 < previous"),
    (['{"prompt_len": 10, "output_len": 4, "session": "a", "turn": 0, "shared_prefix_len": 5}',
      '{"prompt_len": 20, "output_len": 4, "session": "a", "turn": 1}'], r":2: .*shared_prefix_len changes"),
    (['{"prompt_len": 10, "output_len": 4, "session": "a"}'], r":1: .*session, turn: give both"),
    (['{"prompt_len": 10, "output_len": 4, "shared_prefix_len": 11}'], r":1: .*shared_prefix_len"),
    (['{"prompt_len": 10, "output_len": 4, "session": "a", "turn": -1}'], r":1: .*turn: must be"),
    (['{"prompt_len": 10, "output_len": 4, "session": [1], "turn": 0}'], r":1: .*session: must be"),
    (['{"prompt_len": 10, "output_len": 4, "session": 1, "turn": 0, "think_time_s": -1}'], r":1: .*think_time_s"),
])
def test_session_errors_name_the_file_and_line(tmp_path: Path, lines: list[str], match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl" + match):
        read_lengths(path)
