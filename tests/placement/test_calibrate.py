"""The simulator-fidelity calibration (placement/calibrate.py, host_speed.py, fidelity.py) on synthetic
results directories written with bench's own writer, and benchmarks/fidelity.py run as a script."""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.bench.lengths import RequestLengths
from pdserve.bench.metrics import attainment
from pdserve.bench.record import RequestRecord
from pdserve.bench.results import write_results
from pdserve.config import SLOConfig
from pdserve.placement.calibrate import KV_BYTES_PER_TOKEN, Setup, calibrate_in_situ, calibrate_unloaded, simulate_records
from pdserve.placement.fidelity import compare, load_runs, markdown
from pdserve.placement.host_speed import corun_slowdown, own_speed, speed_factors
from pdserve.placement.latency import Coeffs, PhaseProfile
from pdserve.placement.profile_file import profile_to_json
from pdserve.types import StepRecord

ROOT = Path(__file__).resolve().parents[2]
# Roughly SmolLM2 on one core: ~3 ms per prompt token, ~40 ms per decode step.
PROFILE = PhaseProfile(prefill=Coeffs(0.02, 3e-3, 1e-7), decode_small=Coeffs(0.035, 2e-6, 1e-3),
                       decode_large=Coeffs(0.035, 2e-6, 1e-3))


def _synthetic_run(tmp: Path, kind: str, label: str, setup, slo: SLOConfig, rates=(0.2, 0.6),
                   speeds: dict[float, float] | None = None) -> None:
    """A results directory whose 'measurements' are the simulator's own (each rate's steps
    speeds[rate]× as long, when given), plus one failed request."""
    rng = random.Random(0)
    lengths = [RequestLengths(rng.randint(16, 400), rng.randint(1, 48)) for _ in range(24)]
    by_rate = {}
    for rate in rates:
        t, records = 0.0, []
        for i, ln in enumerate(lengths):
            t += rng.expovariate(rate)
            records.append(RequestRecord(i, ln.prompt_len, ln.output_len, t))
        res = simulate_records(kind, records, PROFILE.scaled(speeds[rate]) if speeds else PROFILE, setup)
        for r, ttft, tpot in zip(records, res.ttft_s, res.tpot_s):
            r.ok, r.ttft_s, r.num_output_tokens = True, ttft, r.output_len
            r.e2e_s = ttft + tpot * max(0, r.output_len - 1)
        records[-1].ok, records[-1].error = False, "boom"  # a failure is a miss in both
        by_rate[rate] = records
    summary = {"label": label, "slo": dataclasses.asdict(slo), "points": []}
    write_results(tmp / label, summary, by_rate, lengths)


def test_fidelity_on_synthetic_results_matches_exactly(tmp_path):
    slo = SLOConfig(ttft_s=1.5, tpot_s=0.06)
    setup = Setup()
    for kind, label in (("disaggregated", "disaggregated"), ("prefill_priority", "colocated-prefill-priority"),
                        ("chunked", "colocated-chunked")):
        _synthetic_run(tmp_path, kind, label, setup, slo)
    (tmp_path / "profile.json").write_text(json.dumps(profile_to_json({"HuggingFaceTB/SmolLM2-135M-Instruct": {1: PROFILE}})))
    out = tmp_path / "fidelity.md"
    script = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), str(tmp_path), "--profile",
                             str(tmp_path / "profile.json"), "--overheads", "none", "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr
    assert script.stdout.strip() == out.read_text().strip()  # printed and written
    runs = load_runs([str(tmp_path)])
    rows = compare(runs, (PROFILE, setup), {label: (PROFILE, setup) for label in runs})
    assert len(rows) == 6 and {r["system"] for r in rows} == {"disaggregated", "colocated-prefill-priority",
                                                              "colocated-chunked"}
    # The last request failed in the "measurement" (a miss) but is served, in time, by the
    # simulator (it is alone after the others at these rates): exactly 1/24 apart, nothing else.
    assert all(r["diff"] == pytest.approx(1 / 24) and r["failed"] == 1 for r in rows)
    assert any(0 < r["measured"] < 0.9 for r in rows)  # the SLOs bite somewhere: not a trivial match
    text = out.read_text()
    assert "max |simulated − measured| = 4.2 points over 6 points" in text
    assert "| colocated-chunked | 0.6 | 24 | 1 |" in text


def test_calibration_recovers_known_overheads(tmp_path):
    slo = SLOConfig(ttft_s=1.5, tpot_s=0.06)
    _synthetic_run(tmp_path, "disaggregated", "disaggregated", Setup(), slo, rates=(0.2,))
    truth = Setup(step_overhead_s=0.004, ttft_overhead_s=0.030, transfer_overhead_s=0.025)
    rows = [json.loads(x) for x in (tmp_path / "disaggregated" / "lengths.jsonl").read_text().splitlines()][1:9]
    records = [RequestRecord(i, r["prompt_len"], r["output_len"], 1000.0 * i) for i, r in enumerate(rows)]
    res = simulate_records("disaggregated", records, PROFILE, truth)
    unloaded = [{"prompt_len": r.prompt_len, "output_len": r.output_len, "server_timings": {
        "transfer_s": 0.025 + r.prompt_len * KV_BYTES_PER_TOKEN / truth.link_bytes_per_s}} for r in records]
    (tmp_path / "slo.json").write_text(json.dumps({
        "unloaded_ttft_s": statistics.median(res.ttft_s),
        "unloaded_tpot_s": statistics.median(t for t, r in zip(res.tpot_s, records) if r.output_len >= 2),
        "measured_on": "disaggregated", "unloaded_requests": unloaded}))
    setup, note = calibrate_unloaded(tmp_path / "slo.json", load_runs([str(tmp_path)]), PROFILE, Setup())
    assert setup.transfer_overhead_s == pytest.approx(0.025, abs=1e-9)
    assert setup.step_overhead_s == pytest.approx(0.004, abs=2e-4)
    assert setup.ttft_overhead_s == pytest.approx(0.030, abs=1e-3)
    assert "step overhead 4.0 ms" in note and "KV-transfer overhead 25 ms" in note


def test_measured_attainment_matches_bench(tmp_path):
    slo = SLOConfig(ttft_s=1.5, tpot_s=0.06)
    _synthetic_run(tmp_path, "chunked", "colocated-chunked", Setup(), slo, rates=(0.6,))
    run = load_runs([str(tmp_path / "colocated-chunked")])["colocated-chunked"]
    (row,) = compare({"colocated-chunked": run}, (PROFILE, Setup()), {"colocated-chunked": (PROFILE, Setup())})
    assert row["measured"] == attainment(run.records[0.6], slo)


def _calibration_run(tmp: Path, truth: PhaseProfile, gap_s: float, path_s: float, link_s: tuple[float, float]) -> Path:
    """A calibration run of the disaggregated system as headline.py saves it: engine steps timed by
    `truth` with `gap_s` between back-to-back steps, and requests whose client TTFT exceeds the
    server's queue + prefill by `path_s` and whose pulls take link_s[0] + tokens · link_s[1]."""
    rng = random.Random(3)
    lines, t = [], 1000.0
    for _ in range(60):  # prefill steps of 1-3 prompts
        lens = [rng.randint(8, 500) for _ in range(rng.randint(1, 3))]
        d = truth.prefill_s(sum(lens), sum(n * n for n in lens))
        lines.append({"worker": "prefill-0", "rate": 0.5, "start_s": t, "duration_s": d, "new": lens, "cached": [0] * len(lens)})
        t += d + gap_s
    t += 5.0  # idle: not a step gap
    for _ in range(300):  # decode steps at batch 1-8
        ctx = [rng.randint(20, 560) for _ in range(rng.randint(1, 8))]
        d = truth.decode_s(sum(ctx), len(ctx))
        lines.append({"worker": "decode-0", "rate": 0.5, "start_s": t, "duration_s": d, "new": [1] * len(ctx),
                      "cached": [c - 1 for c in ctx]})
        t += d + gap_s
    run = tmp / "disaggregated"
    run.mkdir(parents=True)
    (run / "steps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    lengths = [RequestLengths(rng.randint(16, 500), rng.randint(2, 48)) for _ in range(20)]
    records = []
    for i, ln in enumerate(lengths):
        r = RequestRecord(i, ln.prompt_len, ln.output_len, float(i), ok=True, num_output_tokens=ln.output_len)
        queue, prefill = rng.uniform(0, 0.5), truth.prefill_s(ln.prompt_len, ln.prompt_len ** 2)
        r.server_timings = {"queue_s": queue, "prefill_s": prefill, "transfer_s": link_s[0] + ln.prompt_len * link_s[1]}
        r.ttft_s, r.e2e_s = queue + prefill + path_s, queue + prefill + path_s + 0.05 * (ln.output_len - 1)
        records.append(r)
    write_results(run, {"label": "disaggregated", "slo": dataclasses.asdict(SLOConfig(1.0, 0.1)), "points": []},
                  {0.5: records}, lengths)
    return run


def test_in_situ_calibration_recovers_the_serving_conditions(tmp_path):
    truth = PhaseProfile(prefill=Coeffs(0.07, 2.6e-3, 5e-7), decode_small=Coeffs(0.05, 1.2e-5, 8e-3),
                         decode_large=Coeffs(0.05, 1.2e-5, 8e-3))
    run = _calibration_run(tmp_path, truth, gap_s=0.0012, path_s=0.009, link_s=(0.1, 2e-4))
    profile, setup, note = calibrate_in_situ(run, Setup())
    assert setup.step_overhead_s == pytest.approx(0.0012, rel=1e-6)  # the 5 s idle gap is not overhead
    assert setup.host_slowdown == 0.0  # no step ran beside another: nothing to tell apart
    assert setup.ttft_overhead_s == pytest.approx(0.009, abs=1e-9)
    assert setup.transfer_overhead_s == pytest.approx(0.1, rel=1e-6)
    assert KV_BYTES_PER_TOKEN / setup.link_bytes_per_s == pytest.approx(2e-4, rel=1e-6)
    for lens in ([400], [100, 300, 20]):
        want = truth.prefill_s(sum(lens), sum(n * n for n in lens))
        assert profile.prefill_s(sum(lens), sum(n * n for n in lens)) == pytest.approx(want, rel=1e-6)
    for b, ctx in ((1, 300), (4, 1200), (8, 4000)):
        assert profile.decode_s(ctx, b) == pytest.approx(truth.decode_s(ctx, b), rel=1e-6)
    assert "in-situ profile from 360 steps" in note and "100 ms + 0.23 GB/s" in note


def test_corun_slowdown_separates_steps_alone_from_steps_beside_another_engine():
    def decode(start: float, k: float) -> StepRecord:  # one sequence at context 100, k × the model's time
        return StepRecord(start, k * PROFILE.decode_s(100, 1), (1,), (99,))

    d = PROFILE.decode_s(100, 1)
    logs = {"a": [decode(0.0, 1.0), decode(10.0, 1.1)],  # alone, then beside b's step
            "b": [decode(10.0, 1.1), decode(20.0 + 0.5 * d, 1.0)]}  # beside a's, then alone
    alone, beside = corun_slowdown(logs, PROFILE)
    assert alone == pytest.approx(1.0) and beside == pytest.approx(1.1)


def _probes(path: Path, speeds: list[float]) -> None:
    """probes.jsonl of len(speeds) probes, each a 300-token prefill and 20 decode steps taking
    speeds[i]× the model's time."""
    lines = []
    for i, k in enumerate(speeds):
        lines.append({"worker": "prefill-0", "probe": i, "start_s": 100.0 * i, "new": [300], "cached": [0],
                      "duration_s": k * PROFILE.prefill_s(300, 300 ** 2)})
        lines += [{"worker": "decode-0", "probe": i, "start_s": 100.0 * i + 2 + j, "new": [1], "cached": [300 + j],
                   "duration_s": k * PROFILE.decode_s(301 + j, 1)} for j in range(20)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_probes_rescale_each_point_by_the_host_speed_around_it(tmp_path):
    slo = SLOConfig(ttft_s=1.5, tpot_s=0.06)
    _synthetic_run(tmp_path / "sweep", "disaggregated", "disaggregated", Setup(), slo,
                   speeds={0.2: 1.0, 0.6: 1.15})
    _probes(tmp_path / "cal" / "disaggregated" / "probes.jsonl", [1.02, 0.98])  # the calibration ran at 1.0×
    _probes(tmp_path / "sweep" / "disaggregated" / "probes.jsonl", [1.0, 1.0, 1.3])  # slower after the 0.2 point
    runs = load_runs([str(tmp_path / "sweep")])
    speeds = {"disaggregated": speed_factors(runs["disaggregated"], tmp_path / "cal" / "disaggregated", PROFILE)}
    assert speeds["disaggregated"] == pytest.approx({0.2: 1.0, 0.6: 1.15})
    model = {"disaggregated": (PROFILE, Setup())}
    fixed = compare(runs, (PROFILE, Setup()), model)
    probed = compare(runs, (PROFILE, Setup()), model, speeds=speeds)
    assert [r["diff"] for r in probed] == pytest.approx([1 / 24, 1 / 24])  # only the failed request differs
    assert fixed[1]["diff"] > 1 / 24 + 1e-9  # the slower host did cost attainment at 0.6
    assert "| 1.150× |" in markdown(probed, [])


def test_speed_factors_want_a_probe_around_every_point(tmp_path):
    _synthetic_run(tmp_path / "sweep", "chunked", "colocated-chunked", Setup(), SLOConfig(1.5, 0.06))
    run = load_runs([str(tmp_path / "sweep")])["colocated-chunked"]
    _probes(tmp_path / "cal" / "probes.jsonl", [1.0])
    with pytest.raises(ValueError, match="no probes.jsonl"):
        speed_factors(run, tmp_path / "cal", PROFILE)
    _probes(run.path / "probes.jsonl", [1.0, 1.1])  # the run has two rate points: three probes wanted
    with pytest.raises(ValueError, match="2 probes for 2 rate points"):
        speed_factors(run, tmp_path / "cal", PROFILE)


def test_own_speed_models_the_overlapped_steps_as_slowed_by_the_shared_host():
    d = PROFILE.decode_s(100, 1)
    step = lambda start, k: StepRecord(start, k * d, (1,), (99,))
    # a: one step alone, one beside b's; every step 1.1× what the model says for its situation
    logs = {"a": [step(0.0, 1.1), step(10.0, 1.1 * 1.2)], "b": [step(10.0, 1.1 * 1.2)]}
    assert own_speed(logs, PROFILE, host_slowdown=0.2) == pytest.approx(1.1)
    assert own_speed(logs, PROFILE, host_slowdown=0.0) == pytest.approx(1.1 * 3.4 / 3)
