"""Replaying recorded traces (placement/trace.py): exact arrivals, step overheads, and the router's
own dispatch policy (router/policies.py) for colocated requests."""

from __future__ import annotations

import random

import pytest

from pdserve.placement.latency import Coeffs, InstanceLatency, PhaseProfile
from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.simulator import simulate
from pdserve.placement.trace import (DisaggregatedRouterDispatch, RouterDispatch, in_recorded_order, recorded_trace,
                                     replay, with_step_overhead)
from pdserve.placement.workload import Trace

# Roughly SmolLM2 on one core: ~3 ms per prompt token, ~40 ms per decode step.
PROFILE = PhaseProfile(prefill=Coeffs(0.02, 3e-3, 1e-7), decode_small=Coeffs(0.035, 2e-6, 1e-3),
                       decode_large=Coeffs(0.035, 2e-6, 1e-3))


def _coloc(policy: str = "prefill_priority") -> SimDeployment:
    lat = InstanceLatency(tp=1, pp=1, profile=PROFILE, kv_capacity_tokens=20_000)
    return SimDeployment(mode="colocated", prefill=(lat, lat), colocated_policy=policy, chunk_size=32, max_num_seqs=64)


def test_recorded_trace_sorts_and_maps_back():
    trace, order = recorded_trace([3.0, 1.0, 2.0, 1.0], [10, 20, 30, 40], [5, 6, 7, 8])
    assert trace.unit_arrivals == (1.0, 1.0, 2.0, 3.0)
    assert trace.prompt_lens == (20, 40, 30, 10) and order == [1, 3, 2, 0]
    assert trace.arrivals(1.0) == [1.0, 1.0, 2.0, 3.0]  # replayed at rate 1: the recorded seconds
    lat = InstanceLatency(tp=1, pp=1, profile=PROFILE, kv_capacity_tokens=20_000)
    res = in_recorded_order(simulate(SimDeployment(prefill=(lat,), decode=(lat,)), trace, 1.0), order)
    # request 0 (arrives last, 10 tokens, alone by then) has the plain prefill time as TTFT
    assert res.ttft_s[0] == pytest.approx(PROFILE.prefill_s(10, 100))


def test_step_overhead_adds_to_every_constant_term():
    p = with_step_overhead(PROFILE, 0.005)
    assert p.prefill_s(100, 10_000) == pytest.approx(PROFILE.prefill_s(100, 10_000) + 0.005)
    assert p.decode_s(1000, 4) == pytest.approx(PROFILE.decode_s(1000, 4) + 0.005)
    assert p.decode_large.a == pytest.approx(PROFILE.decode_large.a + 0.005)


def test_router_dispatch_spreads_light_load_over_both_instances():
    # Requests far apart: the simulator's own policy (fewest outstanding prompt tokens, 0 for both)
    # always picks instance 0; the router's rotates ties like router/policies.py.
    trace = Trace(tuple(100.0 * i for i in range(6)), (50,) * 6, (10,) * 6)
    sim = RouterDispatch(_coloc(), trace, 1.0)
    picks = []
    original = sim.pick

    def spy() -> int:
        picks.append(original())
        return picks[-1]

    sim.pick = spy
    sim.run()
    assert picks == [0, 1, 0, 1, 0, 1]


def test_router_dispatch_prefers_fewer_requests_in_flight():
    # Two long requests land on 0 and 1; 1's finishes first, so the third goes to 1.
    trace = Trace((0.0, 0.01, 5.0), (20, 20, 20), (400, 100, 10))
    sim = RouterDispatch(_coloc(), trace, 1.0)
    picks = []
    original = sim.pick
    sim.pick = lambda: picks.append(original()) or picks[-1]
    sim.run()
    assert picks == [0, 1, 1]


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
def test_replay_is_deterministic_and_serves_everything(policy):
    rng = random.Random(1)
    t, arrivals = 0.0, []
    for _ in range(40):
        t += rng.expovariate(0.5)
        arrivals.append(t)
    trace = Trace(tuple(arrivals), tuple(rng.randint(8, 500) for _ in range(40)),
                  tuple(rng.randint(2, 64) for _ in range(40)))
    a, b = replay(_coloc(policy), trace), replay(_coloc(policy), trace)
    assert a == b
    assert all(x < float("inf") for x in a.ttft_s) and all(x > 0 for x in a.tpot_s)


@pytest.mark.parametrize("policy, third", [("prefill_priority", 1), ("chunked", 0)])
def test_router_dispatch_sees_kv_usage_from_before_a_running_prefill_step(policy, third):
    # 0 decodes a long output on instance 0; 1 (1,000 prompt tokens) goes to instance 1; 2 arrives
    # while 1 prefills. Prefill-priority runs that prefill as one ~3 s step, and an instance
    # answers the router's stats poll only between steps: the router still sees instance 1 empty
    # and sends 2 there. Chunked steps are short, so the router sees 1's KV and picks instance 0.
    trace = Trace((0.0, 0.01, 1.0), (20, 1000, 20), (200, 10, 10))
    sim = RouterDispatch(_coloc(policy), trace, 1.0)
    picks = []
    original = sim.pick
    sim.pick = lambda: picks.append(original()) or picks[-1]
    sim.run()
    assert picks == [0, 1, third]


def test_disaggregated_router_dispatch_calls_the_routers_policies():
    # Two prefill and two decode instances. Requests 0 and 1 arrive far apart, to idle instances:
    # the router's policies rotate ties per pool (the simulator's own rules pick instance 0 both
    # times). Request 2 (400 tokens) goes to prefill 0 by the rotation, 3 to prefill 1 and is done
    # when 4 arrives, whose rotation would pick 0: the fewest outstanding tokens sends it to 1.
    lat = InstanceLatency(tp=1, pp=1, profile=PROFILE, kv_capacity_tokens=20_000)
    dep = SimDeployment(prefill=(lat, lat), decode=(lat, lat))
    trace = Trace((0.0, 100.0, 200.0, 200.01, 200.5), (50, 50, 400, 50, 50), (10, 10, 10, 10, 10))
    sim = DisaggregatedRouterDispatch(dep, trace, 1.0)
    picks: dict[str, list[int]] = {"prefill": [], "decode": []}
    for pool in picks:
        original = getattr(sim, f"pick_{pool}")
        setattr(sim, f"pick_{pool}", lambda o=original, p=pool: picks[p].append(o()) or picks[p][-1])
    res = sim.run()
    assert picks["prefill"] == [0, 1, 0, 1, 1]
    assert picks["decode"][:2] == [0, 1]
    assert replay(dep, trace) == res and replay(dep, trace, router_dispatch=False) == simulate(dep, trace, 1.0)
