"""The discrete-event simulator against hand-computed cases and a per-iteration reference."""

from __future__ import annotations

import dataclasses
import random

import pytest

from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.lane import Lane
from pdserve.placement.latency import Coeffs, Curve, InstanceLatency, PhaseProfile
from pdserve.placement.simulator import simulate
from pdserve.placement.transfer import TransferModel
from pdserve.placement.workload import Trace, WorkloadLengths, load_lengths, sharegpt_like

PROFILE = PhaseProfile(prefill=Coeffs(0.010, 1e-4, 1e-8), decode_small=Coeffs(0.020, 6e-7, 4e-4),
                       decode_large=Coeffs(0.007, 5e-7, 1.5e-3), large_batch_threshold=8)
# A measured profile: decode step time not linear (nor monotone) in the batch, up to batch 6.
CURVED = dataclasses.replace(PROFILE, decode_batch=Curve((1, 2, 3, 4, 6), (0.020, 0.031, 0.038, 0.034, 0.036), 7e-7),
                             prefill_tokens=Curve((16, 256, 1024), (0.012, 0.036, 0.120), 1e-8))


def inst(tp: int = 1, pp: int = 1, cap: int = 10**7, profile: PhaseProfile = PROFILE) -> InstanceLatency:
    return InstanceLatency(tp=tp, pp=pp, profile=profile, kv_capacity_tokens=cap, pp_stage_overhead_s=0.001 * pp)


def one(p: int, o: int) -> Trace:
    return Trace((1.0,), (p,), (o,))


def test_lane_boundary_matches_stepping():
    rng = random.Random(0)
    for _ in range(300):
        lane = Lane(inst(), 0)
        lane.t0, lane.i0 = rng.random(), rng.randrange(50)
        for j in range(rng.randrange(1, 30)):
            lane.add(j, rng.randrange(1, 2000), 10**6)
        now = lane.t0 + rng.random() * 3
        i = lane.i0
        while lane.time_at(i) < now:
            i += 1
        assert lane.boundary_at_or_after(now) == i
        assert lane.boundary_at_or_after(lane.time_at(i)) == i  # a wake-up at a boundary finds it


def test_single_request_disaggregated_by_hand():
    xfer = TransferModel(kv_bytes_per_token=1e6, bytes_per_s=1e9, overhead_s=0.002)
    dep = SimDeployment(prefill=(inst(),), decode=(inst(),), transfer=xfer)
    res = simulate(dep, one(500, 11), rate=1.0)
    assert res.ttft_s[0] == pytest.approx(PROFILE.prefill_s(500, 500**2))
    iters = sum(PROFILE.decode_s(501 + k, 1) for k in range(10))
    assert res.tpot_s[0] == pytest.approx((xfer.transfer_s(500) + iters) / 10)


def test_single_request_colocated_and_pipeline():
    res = simulate(SimDeployment(mode="colocated", prefill=(inst(),)), one(300, 5), 1.0)
    assert res.ttft_s[0] == pytest.approx(PROFILE.prefill_s(300, 300**2))
    assert res.tpot_s[0] == pytest.approx(sum(PROFILE.decode_s(301 + k, 1) for k in range(4)) / 4)
    pp2 = simulate(SimDeployment(prefill=(inst(pp=2),), decode=(inst(),)), one(300, 2), 1.0)
    assert pp2.ttft_s[0] == pytest.approx(PROFILE.prefill_s(300, 300**2) + 2 * 0.002)  # T/pp + pp ms per stage


def _reference_decode(profile, arrivals, plens, olens):
    """Per-iteration continuous batching, unlimited memory: the ground truth for the closed form."""
    order = sorted(range(len(arrivals)), key=arrivals.__getitem__)
    t, k, running, tpot = 0.0, 0, [], [0.0] * len(arrivals)
    while k < len(order) or running:
        if not running:
            t = max(t, arrivals[order[k]])
        while k < len(order) and arrivals[order[k]] <= t:
            r = order[k]
            running.append([r, plens[r] + 1, olens[r] - 1])
            k += 1
        t += profile.decode_s(sum(x[1] for x in running), len(running))
        for x in running:
            x[1] += 1
            x[2] -= 1
            if x[2] == 0:
                tpot[x[0]] = (t - arrivals[x[0]]) / (olens[x[0]] - 1)
        running = [x for x in running if x[2] > 0]
    return tpot


@pytest.mark.parametrize("profile", [PROFILE, CURVED], ids=["linear", "measured-curve"])
def test_decode_closed_form_equals_per_iteration_reference(profile):
    w = WorkloadLengths("w", tuple(range(20, 420, 7)), tuple(range(2, 200, 3))[:58])
    trace = w.trace(300, seed=3)
    for rate in (5.0, 40.0, 200.0):  # idle, batch sizes around the small/large split, heavy
        dep = SimDeployment(prefill=(), decode=(inst(profile=profile),), phases="decode")
        got = simulate(dep, trace, rate).tpot_s
        want = _reference_decode(profile, trace.arrivals(rate), trace.prompt_lens, trace.output_lens)
        assert got == pytest.approx(want, rel=1e-9)


def test_back_pressure_and_memory_limits():
    trace = sharegpt_like(2000, seed=1).trace(400, seed=2)
    free = SimDeployment(prefill=(inst(),), decode=(inst(),))
    tight = SimDeployment(prefill=(inst(cap=4096),), decode=(inst(cap=6000),))
    a, b = simulate(free, trace, 8.0), simulate(tight, trace, 8.0)
    assert all(x < float("inf") for x in b.ttft_s)  # everything that fits is served
    assert sum(b.ttft_s) > sum(a.ttft_s)  # un-pulled KV holds prefill back
    huge = Trace((0.1,), (5000,), (10,))  # does not fit the prefill instance: never served
    assert simulate(tight, huge, 1.0).ttft_s[0] == float("inf")


def test_deterministic_and_rate_sensitive():
    trace = sharegpt_like(2000).trace(500, seed=0)
    dep = SimDeployment(prefill=(inst(), inst()), decode=(inst(pp=2),))
    assert simulate(dep, trace, 10.0) == simulate(dep, trace, 10.0)
    low, high = simulate(dep, trace, 1.0), simulate(dep, trace, 60.0)
    assert low.attainment(0.3, 0.05) > high.attainment(0.3, 0.05)


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
def test_colocated_policies_serve_everything(policy):
    trace = sharegpt_like(2000).trace(300, seed=4)
    res = simulate(SimDeployment(mode="colocated", prefill=(inst(), inst()), colocated_policy=policy,
                              chunk_size=256), trace, 6.0)
    assert all(x < float("inf") for x in res.ttft_s) and all(x < float("inf") for x in res.tpot_s)
    q = res.percentiles()
    assert q["ttft_p50"] <= q["ttft_p90"] <= q["ttft_p99"]


def test_sharegpt_like_matches_published_means(tmp_path):
    w = sharegpt_like()
    assert w.mean_prompt_len == pytest.approx(755.5, rel=0.03)
    assert w.mean_output_len == pytest.approx(200.3, rel=0.03)
    assert max(p + o for p, o in zip(w.prompt_lens, w.output_lens)) < 2048
    (tmp_path / "l.jsonl").write_text('{"prompt_len": 5, "output_len": 7}\n\n{"prompt_len": 9, "output_len": 1}\n')
    (tmp_path / "l.csv").write_text("prompt_len,output_len\n5,7\n")
    assert load_lengths(tmp_path / "l.jsonl").prompt_lens == (5, 9)
    assert load_lengths(tmp_path / "l.csv").output_lens == (7,)
    t = w.trace(100, seed=1)
    assert t.arrivals(2.0)[-1] == pytest.approx(t.unit_arrivals[-1] / 2)


def test_pull_at_step_boundary_waits_for_the_running_iteration():
    """pdserve's decode worker starts a pull only between iterations: a request arriving just
    after a boundary of a busy instance joins one iteration later than under DistServe's model."""
    xfer = TransferModel(kv_bytes_per_token=0.0, bytes_per_s=1e9, overhead_s=0.001)
    d = [PROFILE.decode_s(101 + k, 1) for k in range(3)]  # A's first iterations, alone
    t_b = 1.001 + d[0] + d[1] + 1e-4  # B arrives just after A's second boundary
    trace = Trace((1.0, t_b), (100, 20), (50, 11))
    finish = {}
    for at_boundary in (False, True):
        dep = SimDeployment(prefill=(), decode=(inst(),), phases="decode", transfer=xfer, pull_at_step_boundary=at_boundary)
        res = simulate(dep, trace, 1.0)
        finish[at_boundary] = t_b + res.tpot_s[1] * 10
    assert finish[True] - finish[False] == pytest.approx(d[2], abs=1e-4)  # one more iteration of A alone


def test_shared_host_slows_the_steps_that_start_beside_a_busy_instance():
    trace = Trace((0.0, 1.0), (10, 100), (200, 2))  # a long generation, then a prompt while it decodes
    base = SimDeployment(prefill=(inst(),), decode=(inst(),))
    a = simulate(base, trace, 1.0)
    b = simulate(dataclasses.replace(base, host_slowdown=0.5), trace, 1.0)
    # the first prompt prefills with the decode instance idle, the second while it decodes
    assert b.ttft_s[0] == pytest.approx(a.ttft_s[0]) == pytest.approx(PROFILE.prefill_s(10, 100))
    assert a.ttft_s[1] == pytest.approx(PROFILE.prefill_s(100, 10_000))
    assert b.ttft_s[1] == pytest.approx(1.5 * PROFILE.prefill_s(100, 10_000))
    # the generation runs slower only while the prefill runs beside it, from its next boundary on
    slowed = 1.5 * PROFILE.prefill_s(100, 10_000)
    assert a.tpot_s[0] < b.tpot_s[0] < a.tpot_s[0] + 0.5 * slowed / 199 + 1e-9
    with pytest.raises(ValueError, match="host_slowdown"):
        dataclasses.replace(base, host_slowdown=-0.1)


def test_shared_host_slows_a_colocated_prefill_beside_the_other_instance():
    from pdserve.placement.trace import RouterDispatch

    trace = Trace((0.0, 1.0), (10, 100), (200, 2))
    base = SimDeployment(mode="colocated", prefill=(inst(), inst()))
    a = RouterDispatch(base, trace, 1.0).run()
    b = RouterDispatch(dataclasses.replace(base, host_slowdown=0.5), trace, 1.0).run()
    # the router sends the prompt to the idle instance (fewer in flight): its prefill runs beside
    # the other instance's decoding
    assert a.ttft_s[1] == pytest.approx(PROFILE.prefill_s(100, 10_000))
    assert b.ttft_s[1] == pytest.approx(1.5 * PROFILE.prefill_s(100, 10_000))
    assert b.ttft_s[0] == pytest.approx(a.ttft_s[0])
