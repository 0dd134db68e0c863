"""End to end: `pdserve bench` against a real OpenAI-compatible streaming HTTP server on
127.0.0.1 (tests/bench/conftest.py) whose single "prefill slot" makes TTFT grow with load."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
from pathlib import Path

import pytest

from pdserve.bench.cli import add_parsers
from pdserve.bench.client import Endpoint
from pdserve.bench.echo_server import EchoConfig
from pdserve.bench.lengths import read_lengths
from pdserve.bench.loadgen import LoadConfig, run_load
from pdserve.bench.quick import quick_benchmark
from pdserve.bench.results import read_results
from pdserve.bench.workload import WorkloadRequest

SLOW_PREFILL = EchoConfig(prefill_s=0.02, token_gap_s=0.002)


def bench(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pdserve")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


def common(server, tokenizer_dir: Path, n: int) -> list[str]:
    return ["--url", server.url, "--tokenizer", str(tokenizer_dir), "--workload", "humaneval",
            "-n", str(n), "--max-output-len", "8", "--no-progress", "--warmup", "1"]


@pytest.mark.parametrize("fake_server", [SLOW_PREFILL], indirect=True)
def test_bench_writes_a_valid_results_directory(fake_server, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert bench(*common(fake_server, tokenizer_dir, 12), "--rate", "5", "1000", "--ttft", "150ms",
                 "--tpot", "50ms", "--gpus", "2", "--label", "fake", "-o", str(out)) == 0
    run = read_results(out)
    s = run.summary
    assert s["label"] == "fake" and s["gpus"] == 2 and s["endpoint"]["model"] == "echo-model"
    assert s["slo"] == {"ttft_s": 0.15, "tpot_s": 0.05, "attainment": 0.9}
    low, high = s["points"]
    assert (low["rate"], high["rate"]) == (5, 1000)
    assert low["num_requests"] == high["num_requests"] == 12 and low["num_failed"] == high["num_failed"] == 0
    # 12 requests at once queue behind a 20 ms prefill slot: the last ones miss a 150 ms TTFT.
    assert low["attainment"] >= 0.9 > high["attainment"]
    assert high["ttft_s"]["p99"] > low["ttft_s"]["p99"]
    assert s["goodput"]["bracket"] == "interpolated" and 5 < s["goodput"]["rate"] < 1000
    assert s["goodput"]["per_gpu"] == pytest.approx(s["goodput"]["rate"] / 2)

    lengths = read_lengths(out / "lengths.jsonl")
    assert len(lengths) == 12 and max(x.output_len for x in lengths) <= 8
    for records in run.records.values():
        assert len(records) == 12
        for r, want in zip(records, lengths):
            assert r.ok and r.num_output_tokens == want.output_len == r.output_len
            assert len(r.itl_s) == r.num_output_tokens - 1
            assert 0 < r.ttft_s <= r.e2e_s
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and {float(r["rate"]) for r in rows} == {5.0, 1000.0}
    with open(out / "points.csv") as f:
        assert [float(r["attainment"]) for r in csv.DictReader(f)] == [low["attainment"], high["attainment"]]
    for png in ("attainment.png", "latency_cdf.png", "slo_scale.png"):
        assert (out / png).stat().st_size > 10_000
    sent = fake_server.config.seen[1:]  # [0] is the warm-up
    assert len(sent) == 24
    assert all(b["ignore_eos"] is True and b["stream"] is True and b["model"] == "echo-model" for b in sent)
    assert sorted(b["max_tokens"] for b in sent[:12]) == sorted(x.output_len for x in lengths)


@pytest.mark.parametrize("fake_server", [EchoConfig(fail_every=4)], indirect=True)
def test_failed_requests_are_counted_not_dropped(fake_server, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    bench(*common(fake_server, tokenizer_dir, 8), "--warmup", "0", "--rate", "50", "-o", str(out))
    point = read_results(out).summary["points"][0]
    assert (point["num_requests"], point["num_failed"]) == (8, 2)
    assert point["attainment"] <= 0.75
    errors = [r for r in read_results(out).records[50.0] if not r.ok]
    assert len(errors) == 2 and all(r.error.startswith("HTTP 500") for r in errors)


@pytest.mark.parametrize("fake_server", [EchoConfig(stall_every=3)], indirect=True)
def test_timeouts_fail_the_request(fake_server) -> None:
    work = [WorkloadRequest("hello", 1, 3)] * 6
    cfg = LoadConfig(rate=100.0, timeout_s=0.5, progress=False)
    result = asyncio.run(run_load(Endpoint(fake_server.url), work, cfg))
    failed = [r for r in result.records if not r.ok]
    assert len(result.records) == 6 and len(failed) == 2
    assert all("timeout" in r.error for r in failed)


@pytest.mark.parametrize("fake_server", [EchoConfig(usage=False)], indirect=True)
def test_chat_endpoint_without_usage_counts_token_chunks(fake_server) -> None:
    work = [WorkloadRequest("hello", 1, 5), WorkloadRequest("bye", 1, 1)]
    endpoint = Endpoint(fake_server.url, "/v1/chat/completions", model="m")
    result = asyncio.run(run_load(endpoint, work, LoadConfig(rate=100.0, max_concurrency=1, progress=False)))
    five, one = result.records
    assert five.ok and five.num_output_tokens == 5 and len(five.itl_s) == 4 and five.tpot_s > 0
    assert one.ok and one.num_output_tokens == 1 and one.tpot_s is None
    assert fake_server.config.seen[0]["messages"] == [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("fake_server", [SLOW_PREFILL], indirect=True)
def test_goodput_search_and_compare(fake_server, tokenizer_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    bench(*common(fake_server, tokenizer_dir, 12), "--goodput", "ttft:150", "tpot:50",
          "--search-start-rate", "40", "--search-steps", "1", "-o", str(a))
    s = read_results(a).summary
    assert s["slo"]["ttft_s"] == pytest.approx(0.15)
    assert len(s["points"]) >= 3 and s["goodput"]["bracket"] == "interpolated"
    rates = sorted(p["rate"] for p in s["points"])
    assert rates[0] <= s["goodput"]["rate"] <= rates[-1]
    bench(*common(fake_server, tokenizer_dir, 12), "--rate", "20", "2000", "--ttft", "150ms",
          "--tpot", "50ms", "--gpus", "2", "--label", "two-gpus", "-o", str(b))
    capsys.readouterr()
    bench("compare", str(a), str(b), "-o", str(tmp_path / "cmp"))
    table = capsys.readouterr().out
    assert "a " in table and "two-gpus" in table
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [x["label"] for x in cmp["systems"]] == ["a", "two-gpus"]
    assert (tmp_path / "cmp" / "attainment.png").stat().st_size > 10_000
    # Recomputed from the records at other SLOs: everything meets 100x, nothing meets 1 ms.
    bench("compare", str(a), str(b), "-o", str(tmp_path / "loose"), "--slo-scale", "100")
    loose = json.loads((tmp_path / "loose" / "compare.json").read_text())["systems"]
    assert [x["goodput"]["bracket"] for x in loose] == ["above_range", "above_range"]
    assert loose[1]["goodput"]["per_gpu"] == pytest.approx(2000 / 2)
    bench("compare", str(a), str(b), "-o", str(tmp_path / "tight"), "--ttft", "1ms")
    tight = json.loads((tmp_path / "tight" / "compare.json").read_text())["systems"]
    assert [x["goodput"]["bracket"] for x in tight] == ["below_range", "below_range"]
    assert tight[0]["slo"]["ttft_s"] == pytest.approx(0.001) and tight[0]["slo"]["tpot_s"] == pytest.approx(0.05)


@pytest.mark.parametrize("fake_server", [SLOW_PREFILL], indirect=True)
def test_quick_benchmark_calibrates_slos_and_prints_goodput(fake_server, tokenizer_dir: Path) -> None:
    lines: list[str] = []
    result = quick_benchmark(fake_server.url, tokenizer=str(tokenizer_dir), rates=(5, 1000),
                             num_requests=8, log=lines.append)
    assert [s.rate for _, s in result.points] == [5, 1000]
    assert 0.02 < result.config.slo.ttft_s < 1.0  # 4x an unloaded TTFT of ~20-50 ms
    assert "goodput" in lines[-1]


@pytest.mark.parametrize("fake_server", [SLOW_PREFILL], indirect=True)
def test_quick_benchmark_derives_its_rates_and_extends_past_either_end(fake_server, tokenizer_dir: Path) -> None:
    from pdserve.config import SLOConfig

    lines: list[str] = []
    result = quick_benchmark(fake_server.url, tokenizer=str(tokenizer_dir), num_requests=6,
                             slo=SLOConfig(10.0, 10.0), log=lines.append)
    rates = [s.rate for _, s in result.points]  # 0.5x, 1x, 2x the one-at-a-time rate, then twice the highest
    assert len(rates) == 4 and rates[1] == pytest.approx(2 * rates[0], rel=0.01) == rates[2] / 2
    assert rates[3] == pytest.approx(2 * rates[2])  # the loose SLO was met even at 2x: one more point above
    assert any(line.startswith("rates:") for line in lines)
    assert result.goodput.bracket == "above_range" and result.config.gpus == 1.0  # echo server: no deployment
    impossible = quick_benchmark(fake_server.url, tokenizer=str(tokenizer_dir), num_requests=4,
                                 slo=SLOConfig(1e-4, 1e-4), log=lines.append)
    low, *derived = [s.rate for _, s in impossible.points]  # one more point, at half the lowest derived
    assert len(derived) == 3 and low == pytest.approx(derived[0] / 2)
    assert impossible.goodput.bracket == "below_range" and impossible.goodput.lowest_rate == low
    assert f"< {low:.3f} req/s, the lowest rate measured" in lines[-1]


@pytest.mark.parametrize("fake_server", [EchoConfig(prefill_s=0.05)], indirect=True)
def test_client_queueing_is_kept_out_of_latency(fake_server) -> None:
    work = [WorkloadRequest("hello", 1, 2)] * 3
    cfg = LoadConfig(rate=float("inf"), max_concurrency=1, progress=False)
    records = asyncio.run(run_load(Endpoint(fake_server.url), work, cfg)).records
    assert [r.arrival_s for r in records] == [0.0, 0.0, 0.0]
    assert max(r.send_delay_s for r in records) > 0.1  # the last one sent waited for two others
    assert all(0.05 <= r.ttft_s < 0.1 for r in records)  # prefill only, no queueing


@pytest.mark.parametrize("fake_server", [EchoConfig(prefill_s=0.01, token_gap_s=0.001)], indirect=True)
def test_a_servers_latency_breakdown_is_kept(fake_server) -> None:
    from pdserve.bench.summary import summarize
    from pdserve.config import SLOConfig

    work = [WorkloadRequest("hello", 1, 3), WorkloadRequest("bye", 1, 5)]
    result = asyncio.run(run_load(Endpoint(fake_server.url), work, LoadConfig(rate=100.0, progress=False)))
    assert result.records[1].server_timings == pytest.approx({"prefill_s": 0.01, "decode_s": 0.004})
    mean = summarize(result.records, SLOConfig(1, 1), 100.0, result.duration_s).server_timings_mean
    assert mean == pytest.approx({"prefill_s": 0.01, "decode_s": 0.003})


def test_run_rates_calls_back_after_the_warm_up_and_each_point(fake_server, tokenizer_dir: Path) -> None:
    from pdserve.bench.runner import BenchConfig, run_rates
    from pdserve.bench.tokenizer import load_tokenizer
    from pdserve.bench.workload import WorkloadSpec, build_workload
    from pdserve.config import SLOConfig

    workload = build_workload(WorkloadSpec("humaneval", 6, max_output_len=4), load_tokenizer(str(tokenizer_dir)))
    cfg = BenchConfig(Endpoint(fake_server.url), SLOConfig(1.0, 1.0), load=LoadConfig(rate=1.0, progress=False), warmup=1)
    seen: list[tuple[float | None, int]] = []  # (rate, requests the server had seen by then)
    result = run_rates(cfg, workload, [1000, 50], log=lambda _: None,
                       after=lambda rate: seen.append((rate, len(fake_server.config.seen))))
    assert seen == [(None, 1), (50, 7), (1000, 13)]  # in rate order, each after its own 6 requests
    assert [s.rate for _, s in result.points] == [50, 1000]
