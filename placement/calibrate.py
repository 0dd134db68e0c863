"""Calibrating the simulator against measured runs of pdserve on this host (the simulator-fidelity
model; benchmarks/fidelity.py prints the comparison).

A `Setup` is the real deployment's settings plus what a profile of bare forwards lacks: the
serving loop's fixed cost per step, the client/router path before the first token, the KV pull's
fixed cost and bandwidth, and how much slower a step runs beside another busy engine of a shared
host. `calibrate_unloaded` takes the overheads from a sequential, unloaded run (slo.json);
`calibrate_in_situ` takes everything from a calibration run's own engine steps and requests.
`simulate_records` replays measured requests (their send times and lengths) on a `Setup`; its
`SimResult.attainment` counts as `bench.metrics.attainment` does (a one-token output has TPOT 0,
so it meets any TPOT SLO).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pdserve.bench.record import RequestRecord
from pdserve.bench.results import RunData, read_results
from pdserve.config import SLOConfig
from pdserve.placement.fit import extend_decode, fit_steps, fit_transfer
from pdserve.placement.host_speed import corun_slowdown
from pdserve.placement.latency import InstanceLatency, PhaseProfile
from pdserve.placement.sim_deployment import SimDeployment, SimResult
from pdserve.placement.steps import read_step_log
from pdserve.placement.trace import in_recorded_order, recorded_trace, replay, with_step_overhead
from pdserve.placement.transfer import TransferModel

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


def replay_deployment(kind: str, profile: PhaseProfile, setup: Setup) -> SimDeployment:
    """The simulated deployment of a `system_kind` under `setup`, every step `step_overhead_s` longer."""
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
    res = in_recorded_order(replay(replay_deployment(kind, profile, setup), trace), order)
    return SimResult(tuple(t + setup.ttft_overhead_s for t in res.ttft_s), res.tpot_s)


def jitter_range(kind: str, records: Sequence[RequestRecord], profile: PhaseProfile, setup: Setup,
                 slo: SLOConfig, jitter_s: float, runs: int, seed: int = 0) -> tuple[float, float]:
    """(lowest, highest) simulated attainment when every send time moves by up to ±jitter_s
    (uniform, `runs` draws): how finely one trace of this size resolves attainment at all. A
    request that lands just before or just after another one finishes is dispatched, batched and
    timed differently, and the difference cascades through the rest of the run."""
    rng = random.Random(seed)
    values = []
    for _ in range(runs):
        moved = [dataclasses.replace(r, arrival_s=max(0.0, r.arrival_s + rng.uniform(-jitter_s, jitter_s)))
                 for r in records]
        values.append(simulate_records(kind, moved, profile, setup).attainment(slo.ttft_s, slo.tpot_s))
    return min(values), max(values)


def calibrate_unloaded(slo_file: Path, runs: dict[str, RunData], profile: PhaseProfile,
                       setup: Setup) -> tuple[Setup, str]:
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
    cal, link_note = _calibrate_link(records, cal)
    return profile, cal, note + link_note


def _calibrate_link(records: Sequence[RequestRecord], setup: Setup) -> tuple[Setup, str]:
    """The KV pull's fixed cost and bandwidth fitted to the requests' measured transfers (none when
    the system is colocated: the router reports 0 there)."""
    pulls = [r for r in records if r.server_timings.get("transfer_s", 0.0) > 0]
    if not pulls:
        return setup, ""
    link = fit_transfer([r.prompt_len for r in pulls], [r.server_timings["transfer_s"] for r in pulls],
                        KV_BYTES_PER_TOKEN, setup.link_bytes_per_s)
    cal = dataclasses.replace(setup, link_bytes_per_s=link.bytes_per_s, transfer_overhead_s=link.overhead_s)
    return cal, (f", KV transfer {link.overhead_s * 1e3:.0f} ms + {link.bytes_per_s / 1e9:.2f} GB/s "
                 f"(from {len(pulls)} pulls)")
