"""Simulator fidelity: simulated vs measured joint SLO attainment of the same trace, per rate.

For every bench results directory (one per deployment, as benchmarks/headline.py writes them) and
every rate in it, the exact recorded trace (arrival offsets, prompt and output lengths) is replayed
through the placement simulator with a latency profile measured on this machine, and the simulated
joint attainment (TTFT and TPOT both met, the run's own SLOs) is compared with the measured one.

What is modelled, beyond the profiled forwards (see BENCHMARKS.md, simulator fidelity):
  - the deployment: 1 prefill + 1 decode instance, or 2 colocated instances (prefill-priority, or
    chunked prefill with the run's token budget), each engine on its own core;
  - the router's dispatch (least outstanding prompt tokens for prefill; least KV pressure then
    fewest in flight for decode/colocated, placement/trace.py);
  - the engine's per-step overhead outside the forward and the client/router path before the first
    token, calibrated from the *unloaded* latency in slo.json (a separate sequential run), never from
    the rate sweep being compared;
  - with --calibration, everything from a calibration run of each system on another trace
    (benchmarks/headline.py --seed 1): an in-situ profile fitted to the engine steps it ran, how
    much slower a step runs beside the other busy engine of the host, the gaps between its steps,
    its client-path TTFT and its measured KV pulls (`calibrate_in_situ`);
  - how fast the host ran during each rate point, as one factor on every step of that point
    (this machine's speed moves by 5-10% within minutes): with --host-speed probes, the speed
    probes headline.py runs before and after every point against the calibration run's probes
    (the same requests, one at a time); with --host-speed own-steps, the point's own engine steps
    against the calibrated model (their durations only, never the requests' latencies);
  - KV transfer: bytes per token ÷ link bandwidth + a fixed overhead, FIFO on the decode side;
  - KV capacity (1 GB of fp32 KV per instance in blocks of 16), max_num_seqs, the token budget.

Usage:
  pdserve profile --model smollm2-135m -o results/profile-smollm2.json \\
      --max-batch-tokens 1024 --max-len 512 --repeats 2
  python benchmarks/fidelity.py --profile results/profile-smollm2.json results/headline \\
      -o results/headline/fidelity.md
  python benchmarks/headline.py -o results/calibration --seed 1 --rates 0.5 1.0   # another trace
  python benchmarks/fidelity.py --profile results/profile-smollm2.json --calibration results/calibration \\
      --host-speed probes results/headline
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import math
import random
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pdserve.bench.metrics import attainment, percentile_stats
from pdserve.bench.record import RequestRecord
from pdserve.bench.results import RunData, read_results
from pdserve.config import SLOConfig
from pdserve.placement.sim_deployment import SimDeployment, SimResult
from pdserve.placement.fit import extend_decode, fit_steps, fit_transfer
from pdserve.placement.latency import InstanceLatency, PhaseProfile
from pdserve.placement.profile import read_step_log
from pdserve.placement.profile_file import load_profile
from pdserve.placement.trace import in_recorded_order, recorded_trace, replay, with_step_overhead
from pdserve.placement.transfer import TransferModel
from pdserve.types import StepRecord

KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M fp32: layers × (K, V) × kv heads × head dim × 4 B
BUSY_GAP_S = 0.02  # a gap between two steps shorter than this is the step loop's own work, not idleness


@dataclass(frozen=True, kw_only=True)
class Setup:
    """The real deployments' settings (benchmarks/headline.py and ServingConfig defaults)."""

    prefill_instances: int = 1
    decode_instances: int = 1
    colocated_instances: int = 2
    chunk_tokens: int = 32
    token_budget: int = 2048  # PoolConfig.max_num_batched_tokens
    max_num_seqs: int = 64
    kv_capacity_tokens: int = int(1e9) // (KV_BYTES_PER_TOKEN * 16) * 16
    link_bytes_per_s: float = 0.51e9  # a KV pull over gRPC on this machine (BENCHMARKS.md §5, transports)
    transfer_overhead_s: float = 2e-3
    pull_at_step_boundary: bool = True  # the decode worker starts pulls between its iterations
    step_overhead_s: float = 0.0
    ttft_overhead_s: float = 0.0  # HTTP + router + Ray before the first token (not engine time)
    host_slowdown: float = 0.0  # a step beside another busy engine is (1 + this)× one alone


def system_kind(label: str) -> str:
    """'disaggregated', 'prefill_priority' or 'chunked', from a headline system's label."""
    if label.startswith("disagg"):
        return "disaggregated"
    if "chunk" in label:
        return "chunked"
    if "coloc" in label:
        return "prefill_priority"
    raise ValueError(f"{label}: cannot tell the deployment from its label (disaggregated*, colocated-*)")


def deployment(kind: str, profile: PhaseProfile, setup: Setup) -> SimDeployment:
    lat = InstanceLatency(tp=1, pp=1, profile=with_step_overhead(profile, setup.step_overhead_s),
                          kv_capacity_tokens=setup.kv_capacity_tokens)
    common = dict(prefill_token_budget=setup.token_budget, max_num_seqs=setup.max_num_seqs,
                  host_slowdown=setup.host_slowdown)
    if kind == "disaggregated":
        transfer = TransferModel(kv_bytes_per_token=KV_BYTES_PER_TOKEN, bytes_per_s=setup.link_bytes_per_s,
                                 overhead_s=setup.transfer_overhead_s)
        return SimDeployment(mode="disaggregated", prefill=(lat,) * setup.prefill_instances,
                          decode=(lat,) * setup.decode_instances, transfer=transfer,
                          pull_at_step_boundary=setup.pull_at_step_boundary, **common)
    return SimDeployment(mode="colocated", prefill=(lat,) * setup.colocated_instances, colocated_policy=kind,
                      chunk_size=setup.chunk_tokens, **common)


def simulate_records(kind: str, records: Sequence[RequestRecord], profile: PhaseProfile,
                     setup: Setup) -> SimResult:
    """Replay exactly these requests (their send times and lengths); results in record order,
    TTFT including the client-path overhead."""
    send = [r.arrival_s + r.send_delay_s for r in records]
    trace, order = recorded_trace(send, [r.prompt_len for r in records], [r.output_len for r in records])
    res = in_recorded_order(replay(deployment(kind, profile, setup), trace), order)
    return SimResult(tuple(t + setup.ttft_overhead_s for t in res.ttft_s), res.tpot_s)


def sim_attainment(res: SimResult, output_lens: Sequence[int], slo: SLOConfig) -> float:
    """As bench.metrics.attainment: a one-token output has no TPOT and meets any TPOT SLO."""
    ok = sum(1 for t, p, n in zip(res.ttft_s, res.tpot_s, output_lens)
             if t <= slo.ttft_s and (n < 2 or p <= slo.tpot_s))
    return ok / len(output_lens)


def jitter_range(kind: str, records: Sequence[RequestRecord], profile: PhaseProfile, setup: Setup, slo: SLOConfig,
                 jitter_s: float, runs: int, seed: int = 0) -> tuple[float, float]:
    """(lowest, highest) simulated attainment when every send time moves by up to ±jitter_s
    (uniform, `runs` draws): how finely one trace of this size resolves attainment at all. A
    request that lands just before or just after another one finishes is dispatched, batched and
    timed differently, and the difference cascades through the rest of the run."""
    rng = random.Random(seed)
    olens = [r.output_len for r in records]
    values = []
    for _ in range(runs):
        moved = [dataclasses.replace(r, arrival_s=max(0.0, r.arrival_s + rng.uniform(-jitter_s, jitter_s)))
                 for r in records]
        values.append(sim_attainment(simulate_records(kind, moved, profile, setup), olens, slo))
    return min(values), max(values)


def calibrate(slo_file: Path, runs: dict[str, RunData], profile: PhaseProfile, setup: Setup) -> tuple[Setup, str]:
    """Overheads from the unloaded run in slo.json: its requests were workload[1:9] sent one at a
    time (benchmarks/headline.py) on the system named there. The per-step overhead is the measured
    median TPOT minus the simulated one; the TTFT overhead is what is left of the measured median
    TTFT after the simulated prefill and one step overhead; the fixed KV-transfer overhead (when
    slo.json holds the requests' server breakdown) is the median measured transfer minus bytes ÷ link."""
    base = json.loads(slo_file.read_text())
    kind = system_kind(base.get("measured_on", "disaggregated"))
    unloaded = [u for u in base.get("unloaded_requests", []) if "transfer_s" in (u.get("server_timings") or {})]
    xfer = setup.transfer_overhead_s
    if unloaded:
        xfer = max(0.0, statistics.median(u["server_timings"]["transfer_s"] - u["prompt_len"] * KV_BYTES_PER_TOKEN
                                          / setup.link_bytes_per_s for u in unloaded))
    lengths = next(iter(runs.values())).path / "lengths.jsonl"
    rows = [json.loads(line) for line in lengths.read_text().splitlines() if line.strip()][1:9]
    records = [RequestRecord(i, r["prompt_len"], r["output_len"], 1000.0 * i) for i, r in enumerate(rows)]
    zero = dataclasses.replace(setup, step_overhead_s=0.0, ttft_overhead_s=0.0, transfer_overhead_s=xfer)
    res = simulate_records(kind, records, profile, zero)
    sim_ttft = statistics.median(res.ttft_s)
    sim_tpot = statistics.median(t for t, r in zip(res.tpot_s, records) if r.output_len >= 2)
    step = max(0.0, base["unloaded_tpot_s"] - sim_tpot)
    ttft = max(0.0, base["unloaded_ttft_s"] - sim_ttft - step)
    note = (f"calibrated on the unloaded run ({kind}): measured TTFT {base['unloaded_ttft_s'] * 1e3:.0f} ms vs "
            f"profile {sim_ttft * 1e3:.0f} ms, TPOT {base['unloaded_tpot_s'] * 1e3:.1f} ms vs profile "
            f"{sim_tpot * 1e3:.1f} ms → step overhead {step * 1e3:.1f} ms, TTFT overhead {ttft * 1e3:.0f} ms"
            + (f", KV-transfer overhead {xfer * 1e3:.0f} ms (median of {len(unloaded)} unloaded pulls)" if unloaded else ""))
    return dataclasses.replace(zero, step_overhead_s=step, ttft_overhead_s=ttft), note


def calibrate_in_situ(run_dir: Path, setup: Setup, shared_host: bool = True,
                      decode_shape: PhaseProfile | None = None) -> tuple[PhaseProfile, Setup, str]:
    """Everything from a calibration run of the same system on another trace: the latency model
    fitted to the engine steps it ran (steps.jsonl) — with `shared_host`, split into the steps
    alone on the host and the slowdown beside another busy engine (`corun_slowdown`), which the
    simulator applies as `SimDeployment.host_slowdown` — the per-step overhead as the mean gap between
    back-to-back steps, the TTFT overhead as the median of the client's TTFT minus the server's
    queueing before the first token and prefill time, and the KV transfer fitted to its measured pulls."""
    logs = read_step_log(run_dir / "steps.jsonl")
    profile, report = fit_steps([s for log in logs.values() for s in log])
    if decode_shape is not None:
        profile = extend_decode(profile, decode_shape)
    gaps = [b.start_s - (a.start_s + a.duration_s) for log in logs.values() for a, b in itertools.pairwise(log)]
    step = statistics.fmean(g for g in gaps if 0 <= g < BUSY_GAP_S)
    records = [r for rs in read_results(run_dir).records.values() for r in rs if r.ok and r.ttft_s is not None]
    ttft = statistics.median(r.ttft_s - (t["queue_s"] - t.get("decode_queue_s", 0.0)) - t["prefill_s"] for r in records
                             if {"queue_s", "prefill_s"} <= (t := r.server_timings).keys())
    pulls = [r for r in records if r.server_timings.get("transfer_s", 0.0) > 0]  # the router reports 0 when colocated
    alone, beside = corun_slowdown(logs, profile)
    cal = dataclasses.replace(setup, step_overhead_s=step, ttft_overhead_s=ttft)
    # The fit averages steps alone and beside the other engine; the simulator tells them apart
    # (when the calibration run had both kinds of step).
    shared_host = shared_host and math.isfinite(alone) and math.isfinite(beside)
    if shared_host:
        cal = dataclasses.replace(cal, host_slowdown=beside / alone - 1)
        profile = profile.scaled(alone)
    note = (f"{run_dir.name}: in-situ profile from {sum(map(len, logs.values()))} steps of {run_dir} "
            f"(prefill mean rel error {report['prefill'].mean_rel_error:.1%}, decode "
            f"{report.get('decode_curve', report['decode_small']).mean_rel_error:.1%}; steps alone on the host "
            f"{alone:.3f}×, beside another engine {beside:.3f}× the fit"
            + (f": host slowdown {cal.host_slowdown:.1%}" if shared_host else "") + "), step overhead "
            f"{step * 1e3:.1f} ms, TTFT overhead {ttft * 1e3:.0f} ms")
    if pulls:
        link = fit_transfer([r.prompt_len for r in pulls], [r.server_timings["transfer_s"] for r in pulls],
                            KV_BYTES_PER_TOKEN, setup.link_bytes_per_s)
        cal = dataclasses.replace(cal, link_bytes_per_s=link.bytes_per_s, transfer_overhead_s=link.overhead_s)
        note += (f", KV transfer {link.overhead_s * 1e3:.0f} ms + {link.bytes_per_s / 1e9:.2f} GB/s "
                 f"(from {len(pulls)} pulls)")
    return profile, cal, note


def corun_slowdown(logs: dict[str, list[StepRecord]], profile: PhaseProfile) -> tuple[float, float]:
    """Mean measured ÷ modelled step time of the steps that ran alone on the host (< 10% of the
    step overlapped by another engine's steps) and of those that ran beside another engine
    (> 90%): what sharing the host costs, which a profile fitted across both averages away."""
    alone, beside = [], []
    for s, overlap in overlapped(logs):
        ratio = s.duration_s / step_time(profile, s)
        if overlap < 0.1:
            alone.append(ratio)
        elif overlap > 0.9:
            beside.append(ratio)
    return (statistics.fmean(alone) if alone else float("nan"), statistics.fmean(beside) if beside else float("nan"))


def own_speed(logs: dict[str, list[StepRecord]], profile: PhaseProfile, host_slowdown: float) -> float:
    """Measured ÷ modelled time of these steps in total, a step modelled (1 + host_slowdown)× as
    long when other engines' steps overlapped more than half of it."""
    measured = modelled = 0.0
    for s, overlap in overlapped(logs):
        measured += s.duration_s
        modelled += step_time(profile, s) * (1 + host_slowdown if overlap > 0.5 else 1.0)
    return measured / modelled


def overlapped(logs: dict[str, list[StepRecord]]) -> Iterator[tuple[StepRecord, float]]:
    """Every step, with the fraction of it that other engines' steps overlapped."""
    spans = sorted((s.start_s, s.start_s + s.duration_s, w) for w, log in logs.items() for s in log)
    for w, log in logs.items():
        others = [(a, b) for a, b, w2 in spans if w2 != w]
        starts = [a for a, _ in others]
        for s in log:
            end, i, overlap = s.start_s + s.duration_s, max(0, bisect.bisect_left(starts, s.start_s) - 1), 0.0
            while i < len(others) and others[i][0] < end:
                overlap += max(0.0, min(end, others[i][1]) - max(s.start_s, others[i][0]))
                i += 1
            yield s, overlap / s.duration_s if s.duration_s > 0 else 0.0


def step_time(profile: PhaseProfile, s: StepRecord) -> float:
    """The simulator's time for this step's shape (placement/simulator.py's three kinds of step)."""
    ctx, (x1, x2) = s.decode_contexts, s.prompt_work
    if not ctx:
        return profile.prefill_s(x1, x2)
    return profile.decode_s(sum(ctx), len(ctx)) + (profile.prefill_extra_s(len(ctx), x1, x2) if x1 else 0.0)


def read_probes(run_dir: Path) -> list[list[StepRecord]]:
    """probes.jsonl (benchmarks/headline.py) by probe number: probe i ran just before the i-th rate
    point, probe i + 1 just after it."""
    path = run_dir / "probes.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no probes.jsonl (run benchmarks/headline.py without --no-probe)")
    probes = steps_by(path, "probe")
    return [[s for log in probes.get(i, {}).values() for s in log] for i in range(int(max(probes, default=-1)) + 1)]


def steps_by(path: Path, key: str) -> dict[float, dict[str, list[StepRecord]]]:
    """A step log's records ({"worker", key, **StepRecord}, as headline.py writes them) by `key`,
    then by worker."""
    out: dict[float, dict[str, list[StepRecord]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            out.setdefault(float(d[key]), {}).setdefault(d["worker"], []).append(StepRecord.from_json(d))
    return out


def host_speed(steps: Sequence[StepRecord], profile: PhaseProfile) -> float:
    """Measured ÷ modelled time of these steps, in total."""
    return sum(s.duration_s for s in steps) / sum(step_time(profile, s) for s in steps)


def speed_factors(run: RunData, calibration_dir: Path, profile: PhaseProfile) -> dict[float, float]:
    """Per rate point of `run`: how many times slower the host ran around it than during the
    calibration run — the probes just before and just after the point against the calibration
    run's probes (the same requests, one at a time), all timed by the calibration's profile."""
    reference = host_speed([s for p in read_probes(calibration_dir) for s in p], profile)
    probes, rates = read_probes(run.path), sorted(run.records)
    if len(probes) != len(rates) + 1 or not all(probes):
        raise ValueError(f"{run.path}: {len(probes)} probes for {len(rates)} rate points (want one before each and one after the last)")
    return {rate: host_speed(probes[i] + probes[i + 1], profile) / reference for i, rate in enumerate(rates)}


def own_speed_factors(run: RunData, profile: PhaseProfile, host_slowdown: float) -> dict[float, float]:
    """Per rate point of `run`: its own engine steps (steps.jsonl) measured ÷ modelled
    (`own_speed`): how fast the host ran during the point. It reads the compared run's step
    durations (not its latencies), so the simulation no longer predicts the host's speed, only
    what the deployment makes of it: scheduling, batching, queueing, transfer."""
    points = steps_by(run.path / "steps.jsonl", "rate")
    return {rate: own_speed(points[rate], profile, host_slowdown) for rate in sorted(run.records)}


def p90(xs: Sequence[float]) -> float:
    """The same percentile `pdserve bench` reports (linear interpolation), for both columns."""
    return percentile_stats(list(xs))["p90"] or float("nan") if xs else float("nan")


Model = tuple[PhaseProfile, Setup]


def compare(runs: dict[str, RunData], base: Model, calibrated: dict[str, Model], jitter_s: float = 0.0,
            jitter_runs: int = 20, sensitivity: float = 0.0,
            speeds: dict[str, dict[float, float]] | None = None) -> list[dict]:
    """Per system and rate: the bare profile (`base`) and the system's calibrated model, every step
    of it `speeds[system][rate]`× as long when given (`speed_factors`); with `jitter_s` the
    calibrated model's attainment range under that much send-time jitter, with `sensitivity` its
    attainment with every step (1 ∓ sensitivity)× as long."""
    rows = []
    for label, run in runs.items():
        kind = system_kind(label)
        profile, (cal_base, cal_setup) = base[0], calibrated[label]
        slo = SLOConfig(run.summary["slo"]["ttft_s"], run.summary["slo"]["tpot_s"])
        for rate in sorted(run.records):
            records = run.records[rate]
            speed = speeds[label][rate] if speeds else None
            cal_profile = cal_base.scaled(speed) if speed else cal_base
            olens = [r.output_len for r in records]
            raw = simulate_records(kind, records, profile, base[1])
            cal = simulate_records(kind, records, cal_profile, cal_setup)
            measured = attainment(records, slo)
            simulated = sim_attainment(cal, olens, slo)
            rows.append(dict(
                system=label, rate=rate, n=len(records), failed=sum(not r.ok for r in records), measured=measured,
                sim_profile=sim_attainment(raw, olens, slo), simulated=simulated, speed=speed,
                diff=abs(simulated - measured),
                ttft_p90=(p90([r.ttft_s for r in records if r.ok and r.ttft_s is not None]), p90(cal.ttft_s)),
                tpot_p90=(p90([t for r in records if (t := r.tpot_s) is not None]),
                          p90([t for t, n in zip(cal.tpot_s, olens) if n >= 2])),
                transfer_ms=_mean([r.server_timings.get("transfer_s") for r in records]),
                path_ms=_mean([r.ttft_s - r.server_timings["ttft_s"] for r in records
                               if r.ok and r.ttft_s is not None and "ttft_s" in r.server_timings]),
                jitter=jitter_range(kind, records, cal_profile, cal_setup, slo, jitter_s, jitter_runs) if jitter_s else None,
                sensitivity=tuple(sim_attainment(simulate_records(kind, records, cal_profile.scaled(k), cal_setup), olens, slo)
                                  for k in (1 - sensitivity, 1 + sensitivity)) if sensitivity else None,
            ))
    return rows


def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return 1e3 * statistics.fmean(xs) if xs else None


def markdown(rows: list[dict], notes: Sequence[str], jitter_ms: float = 0.0, sensitivity: float = 0.0) -> str:
    jit = bool(rows) and rows[0].get("jitter") is not None
    sens = bool(rows) and rows[0].get("sensitivity") is not None
    spd = bool(rows) and rows[0].get("speed") is not None
    out = ["| system | rate (req/s) | requests | failed | measured | simulated (profile only) | "
           + ("host speed | " if spd else "") + "simulated | abs diff (points) "
           + (f"| simulated, ±{jitter_ms:g} ms send jitter (min–max) " if jit else "")
           + (f"| simulated, steps ×{1 - sensitivity:g} / ×{1 + sensitivity:g} " if sens else "")
           + "| TTFT p90 meas / sim (ms) | TPOT p90 meas / sim (ms) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if spd else "") + ("---:|" if jit else "") + ("---:|" if sens else "") + "---:|---:|"]
    for r in rows:
        out.append(f"| {r['system']} | {r['rate']:g} | {r['n']} | {r['failed']} | {100 * r['measured']:.1f}% | "
                   f"{100 * r['sim_profile']:.1f}% | " + (f"{r['speed']:.3f}× | " if spd else "")
                   + f"{100 * r['simulated']:.1f}% | {100 * r['diff']:.1f} | "
                   + (f"{100 * r['jitter'][0]:.1f}–{100 * r['jitter'][1]:.1f}% | " if jit else "")
                   + (f"{100 * r['sensitivity'][0]:.1f}% / {100 * r['sensitivity'][1]:.1f}% | " if sens else "")
                   + f"{_ms(r['ttft_p90'][0])} / {_ms(r['ttft_p90'][1])} | {_ms(r['tpot_p90'][0])} / {_ms(r['tpot_p90'][1])} |")
    worst = max((r["diff"] for r in rows), default=float("nan"))
    out.append("")
    out.append(f"max |simulated − measured| = {100 * worst:.1f} points over {len(rows)} points (target: ≤ 5); "
               f"mean {100 * statistics.fmean(r['diff'] for r in rows) if rows else float('nan'):.1f}; "
               f"within 5 points at {sum(r['diff'] <= 0.05 + 1e-9 for r in rows)}")
    if jit:
        inside = sum(r["jitter"][0] - 1e-9 <= r["measured"] <= r["jitter"][1] + 1e-9 for r in rows)
        out.append(f"measured inside the simulated jitter range at {inside} of {len(rows)} points; "
                   f"widest range {100 * max(r['jitter'][1] - r['jitter'][0] for r in rows):.1f} points")
    for label in dict.fromkeys(r["system"] for r in rows):
        sub = [r for r in rows if r["system"] == label]
        out.append(f"- {label}: max |diff| {100 * max(r['diff'] for r in sub):.1f} points" + "".join(
            f"; measured mean {name} {v:.0f} ms" for name, key in (("KV transfer", "transfer_ms"),
                                                                     ("client-path TTFT", "path_ms"))
            if (v := _mean([r[key] / 1e3 if r[key] is not None else None for r in sub])) is not None))
    out.extend(f"- {n}" for n in notes)
    return "\n".join(out) + "\n"


def _ms(x: float) -> str:
    return "-" if x != x else ("inf" if x == float("inf") else f"{x * 1e3:.0f}")


def load_runs(paths: Sequence[str]) -> dict[str, RunData]:
    """Results directories, or a directory holding them (e.g. results/headline)."""
    runs: dict[str, RunData] = {}
    for p in map(Path, paths):
        dirs = [p] if (p / "requests.jsonl").is_file() else sorted(d for d in p.iterdir() if (d / "requests.jsonl").is_file())
        for d in dirs:
            run = read_results(d)
            runs[run.label] = run
    if not runs:
        raise ValueError(f"no bench results directories in {', '.join(paths)}")
    return runs


def pick_profile(path: str, model: str | None) -> PhaseProfile:
    table = load_profile(path).table
    key = model or next((k for k in table if "smollm2" in k.lower()), None) or next(iter(table))
    if key not in table or 1 not in table[key]:
        raise ValueError(f"{path}: no tp=1 entry for {key!r} (models: {', '.join(table)})")
    return table[key][1]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench results directories, or a directory of them")
    ap.add_argument("--profile", required=True, help="profile file from `pdserve profile`")
    ap.add_argument("--profile-model", default=None, help="model key in the profile (default: the SmolLM2 one)")
    ap.add_argument("--calibration", default=None,
                    help="a calibration run's results (headline.py on another --seed): fit each system's "
                         "profile, overheads and KV transfer to its own steps and requests there")
    ap.add_argument("--host-speed", choices=("fixed", "probes", "own-steps"), default="fixed",
                    help="with --calibration, probes: scale each point's steps by how much slower the host ran "
                         "around it than during the calibration run (both runs' probes.jsonl); own-steps: by how "
                         "much slower the point's own engine steps ran than the calibrated model says")
    ap.add_argument("--no-decode-shape", action="store_true",
                    help="with --calibration: past the largest decode batch the calibration ran, the linear "
                         "decode fit rather than the --profile's curve scaled to the calibration")
    ap.add_argument("--no-shared-host", action="store_true",
                    help="with --calibration: one profile for every step, alone on the host or not")
    ap.add_argument("--slo-file", default=None, help="slo.json with the unloaded latency (default: next to the runs)")
    ap.add_argument("--overheads", choices=("unloaded", "none", "manual"), default="unloaded",
                    help="unloaded: calibrate from slo.json; manual: --step-overhead-ms/--ttft-overhead-ms")
    ap.add_argument("--step-overhead-ms", type=float, default=0.0)
    ap.add_argument("--ttft-overhead-ms", type=float, default=0.0)
    ap.add_argument("--link-gbps", type=float, default=0.51,
                    help="KV transfer bandwidth, GB/s (default: a KV pull over gRPC here, BENCHMARKS.md §5)")
    ap.add_argument("--transfer-overhead-ms", type=float, default=2.0)
    ap.add_argument("--chunk-tokens", type=int, default=32)
    ap.add_argument("--colocated-instances", type=int, default=2)
    ap.add_argument("--jitter-ms", type=float, default=0.0,
                    help="also simulate each trace with every send time moved by up to ± this much (uniform)")
    ap.add_argument("--jitter-runs", type=int, default=20)
    ap.add_argument("--sensitivity", type=float, default=0.0,
                    help="also simulate with every step (1 ∓ this)× as long, e.g. 0.05")
    ap.add_argument("-o", "--output", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)

    runs = load_runs(args.results)
    profile = pick_profile(args.profile, args.profile_model)
    base = Setup(link_bytes_per_s=args.link_gbps * 1e9, transfer_overhead_s=args.transfer_overhead_ms * 1e-3,
                 chunk_tokens=args.chunk_tokens, colocated_instances=args.colocated_instances)
    notes = [f"profile {args.profile}: prefill a={profile.prefill.a * 1e3:.2f} ms b={profile.prefill.b * 1e3:.4f} ms/token, "
             f"decode a={profile.decode_small.a * 1e3:.2f} ms b={profile.decode_small.b * 1e6:.2f} µs/ctx-token "
             f"c={profile.decode_small.c * 1e3:.3f} ms/seq"]
    calibrated = base
    per_system: dict[str, Model] = {}
    if args.calibration:
        for label in runs:
            prof, setup, note = calibrate_in_situ(Path(args.calibration) / label, base, not args.no_shared_host,
                                                  None if args.no_decode_shape else profile)
            per_system[label] = (prof, setup)
            notes.append(note)
    elif args.overheads == "manual":
        calibrated = dataclasses.replace(base, step_overhead_s=args.step_overhead_ms * 1e-3,
                                         ttft_overhead_s=args.ttft_overhead_ms * 1e-3)
        notes.append(f"overheads set by hand: step {args.step_overhead_ms} ms, TTFT {args.ttft_overhead_ms} ms")
    elif args.overheads == "unloaded":
        first = next(iter(runs.values())).path
        slo_file = Path(args.slo_file) if args.slo_file else first.parent / "slo.json"
        if slo_file.is_file():
            calibrated, note = calibrate(slo_file, runs, profile, base)
            notes.append(note)
        else:
            print(f"no {slo_file}: no overheads calibrated", file=sys.stderr)
    speeds = None
    if args.host_speed != "fixed" and not args.calibration:
        ap.error(f"--host-speed {args.host_speed} needs --calibration")
    if args.host_speed == "probes":
        speeds = {label: speed_factors(run, Path(args.calibration) / label, per_system[label][0])
                  for label, run in runs.items()}
        notes.append("host speed from the probes before and after each point ÷ the calibration run's probes")
    elif args.host_speed == "own-steps":
        speeds = {label: own_speed_factors(run, per_system[label][0], per_system[label][1].host_slowdown)
                  for label, run in runs.items()}
        notes.append("host speed from each point's own engine steps (their durations against the calibrated model)")
    rows = compare(runs, (profile, base), {label: per_system.get(label, (profile, calibrated)) for label in runs},
                   args.jitter_ms * 1e-3, args.jitter_runs, args.sensitivity, speeds)
    text = markdown(rows, notes, args.jitter_ms, args.sensitivity)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        sys.exit(f"fidelity: {e}")
