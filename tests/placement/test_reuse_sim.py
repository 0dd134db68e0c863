"""The simulator's multi-turn model: closed-loop sessions, prefix hits, delta pulls, the router's own
dispatch policies and conditional-disaggregation rule, on hand-made sessions."""

from __future__ import annotations

import pytest

from pdserve.bench.lengths import RequestLengths as R
from pdserve.placement.prefix_model import PrefixCacheModel
from pdserve.placement.sessions import SessionTrace, SessionWorkload
from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.simulator import simulate, simulation
from pdserve.placement.transfer import TransferModel
from pdserve.placement.workload import Trace
from pdserve.router import pd_decision
from pdserve.router.pd_decision import PDDecision
from tests.placement.test_simulator import PROFILE, inst

XFER = TransferModel(kv_bytes_per_token=1e6, bytes_per_s=1e9, overhead_s=0.002)


def three_turns(think_s: float = 1.0) -> SessionTrace:
    """One session: a 256-token shared system prompt, prompts 400, 440, 480, answers of 20."""
    items = [R(400, 20, session="a", turn=0, shared_prefix_len=256),
             R(440, 20, session="a", turn=1, shared_prefix_len=256, think_time_s=think_s),
             R(480, 20, session="a", turn=2, shared_prefix_len=256)]
    return SessionWorkload.of("t", items).trace(3)


def disagg(**kw) -> SimDeployment:
    return SimDeployment(prefill=(inst(),), decode=(inst(),), transfer=XFER, **kw)


def test_session_trace_layout_and_head() -> None:
    tr = three_turns()
    assert tr.next_turn == (1, 2, -1) and tr.reusable == (0, 420, 460) and tr.timed == (0,)
    assert tr.new_lens() == (144, 20, 20)  # turn 0: all but the shared prefix; later: the new message
    assert tr.head(2).next_turn == (1, -1) and len(tr.head(2)) == 2


def test_closed_loop_turn_arrives_after_the_answer_plus_think_time() -> None:
    sim = simulation(disagg(), three_turns(think_s=1.0), 1.0)
    res = sim.run()
    finish0 = res.ttft_s[0] + 19 * res.tpot_s[0]  # turn 0 arrived at 0
    assert sim.arrival[1] == pytest.approx(finish0 + 1.0)
    assert sim.arrival[2] == pytest.approx(sim.arrival[1] + res.ttft_s[1] + 19 * res.tpot_s[1])  # no think time


def test_prefix_hits_and_delta_pulls_by_hand() -> None:
    plain = simulation(disagg(), three_turns(), 1.0)
    plain.run()
    assert plain.stats.prefill_hit_tokens == 0 and plain.stats.pulled_tokens == 400 + 440 + 480
    sim = simulation(disagg(prefix_caching=True), three_turns(), 1.0)
    res = sim.run()
    # prefill instance holds the previous prompt (400, then 440; whole blocks: 432)
    assert sim.stats.prefill_hit_tokens == 400 + 432
    # decode instance holds prompt + answer (420 → 416, 460 → 448 in whole blocks); the rest travels
    assert sim.stats.decode_hit_tokens == 416 + 448
    assert sim.stats.pulled_tokens == 400 + (440 - 416) + (480 - 448)
    assert res.ttft_s[1] == pytest.approx(PROFILE.prefill_s(40, 40 * (2 * 400 + 40)))
    assert res.ttft_s[0] == pytest.approx(PROFILE.prefill_s(400, 400**2))  # first use: nothing cached


def test_shared_prefix_hits_across_sessions_after_first_use() -> None:
    items = [R(300, 10, session=s, turn=0, shared_prefix_len=256) for s in range(3)]
    trace = SessionWorkload.of("sys", items).trace(3)
    sim = simulation(SimDeployment(mode="colocated", prefill=(inst(),), prefix_caching=True), trace, 0.1)
    sim.run()
    assert sim.stats.prefill_hit_tokens == 2 * 256


def test_colocated_prefix_caching_cuts_turn_ttft() -> None:
    for policy in ("prefill_priority", "chunked"):
        dep = SimDeployment(mode="colocated", prefill=(inst(),), colocated_policy=policy)
        off, on = simulate(dep, three_turns(), 1.0), simulate(SimDeployment(**{**dep.__dict__, "prefix_caching": True}),
                                                              three_turns(), 1.0)
        assert on.ttft_s[0] == pytest.approx(off.ttft_s[0])
        assert on.ttft_s[1] < 0.5 * off.ttft_s[1] and on.ttft_s[2] < 0.5 * off.ttft_s[2]


def test_lru_eviction_under_a_small_cache() -> None:
    cache = PrefixCacheModel(capacity_tokens=1000)
    cache.insert(1, 600, 0, reserved=0)
    assert cache.hit(1, 600, 0, 700) == 592
    cache.insert(2, 600, 0, reserved=0)  # 1200 > 1000: session 1 (least recent) goes
    assert cache.hit(1, 600, 0, 700) == 0 and cache.hit(2, 600, 0, 700) == 592
    cache.insert(3, 100, 0, reserved=950)  # running requests leave room for 50 tokens: all goes
    assert cache.hit(2, 600, 0, 700) == 0 and cache.total == 0


def test_cache_aware_routing_follows_the_session() -> None:
    items = [R(400 + 60 * k, 20, session=s, turn=k) for s in range(4) for k in range(4)]
    items.sort(key=lambda it: it.turn)  # sessions interleave, turns in order within each
    trace = SessionWorkload.of("mt", items).trace(16)
    two = dict(prefill=(inst(),), decode=(inst(), inst()), transfer=XFER, prefix_caching=True)
    aware, blind = (simulation(SimDeployment(**two, cache_aware=c), trace, 2.0) for c in (True, False))
    aware.run()
    blind.run()
    # cache_aware_decode sends each turn where its history is: ~all of it found, only new messages travel
    assert aware.stats.pulled_tokens <= sum(trace.prompt_lens) - 0.9 * sum(trace.reusable)
    assert blind.stats.pulled_tokens > 1.4 * aware.stats.pulled_tokens  # least_kv spreads turns


def test_conditional_local_prefill_on_the_decode_instance() -> None:
    remote = simulation(disagg(prefix_caching=True), three_turns(), 1.0)
    r_res = remote.run()
    local = simulation(disagg(prefix_caching=True, pd_threshold_tokens=64), three_turns(), 1.0)
    l_res = local.run()
    assert local.decisions == {"long": 1, "short": 2}  # turn 0: 400 uncached; turns 1, 2: 24 and 32
    assert local.stats.num_local == 2 and local.stats.pulled_tokens == 400  # only turn 0 travels
    lane_ctx = 0  # the decode instance is idle when a turn arrives: a local prefill is a plain prefill
    assert l_res.ttft_s[1] == pytest.approx(PROFILE.prefill_s(24, 24 * (2 * 416 + 24)) + lane_ctx)
    assert l_res.ttft_s[1] < r_res.ttft_s[1]


def test_the_decider_is_the_routers_pd_rule(monkeypatch) -> None:
    seen: list[tuple[int, int, int]] = []

    def always_local(self, uncached: int, queued: int, slack: int) -> PDDecision:
        seen.append((uncached, queued, slack))
        return PDDecision(True, "patched", uncached, queued, slack)

    monkeypatch.setattr(pd_decision.PDRule, "decide", always_local)
    sim = simulation(disagg(prefix_caching=True, pd_threshold_tokens=1), three_turns(), 1.0)
    sim.run()
    assert sim.decisions == {"patched": 3} and sim.stats.num_local == 3 and sim.stats.pulled_tokens == 0
    assert seen[0] == (400, 0, 512) and seen[1] == (440 - 416, 0, 512)  # uncached on the decode instance


def test_plain_traces_take_the_plain_simulator() -> None:
    trace = Trace((0.0, 0.5), (300, 200), (10, 5))
    dep = disagg()
    assert type(simulation(dep, trace, 1.0)).__name__ == "DisaggregatedSim"
    on = simulation(disagg(prefix_caching=True), trace, 1.0)
    assert type(on).__name__ == "ReuseDisaggregatedSim"
    assert on.run() == simulate(dep, trace, 1.0)  # nothing to reuse: the same answer
    with pytest.raises(ValueError, match="pd_threshold_tokens"):
        SimDeployment(mode="colocated", prefill=(inst(),), pd_threshold_tokens=8)


def test_dispatch_is_the_routers_policy_function(monkeypatch) -> None:
    from pdserve.router import policies

    calls: list[list[int]] = []

    def last_instance(req, stats, tick) -> str:
        calls.append([s.expected_hit_tokens for s in stats])
        return stats[-1].worker_id

    monkeypatch.setattr(policies, "cache_aware_decode", last_instance)
    items = [R(400 + 60 * k, 20, session=s, turn=k) for s in range(3) for k in range(3)]
    trace = SessionWorkload.of("mt", items).trace(9)
    sim = simulation(SimDeployment(prefill=(inst(),), decode=(inst(), inst()), transfer=XFER, prefix_caching=True,
                                   cache_aware=True), trace, 1.0)
    sim.run()
    assert len(calls) == 9 and set(sim.home) == {1}  # every request where the patched policy said
    assert any(hits[1] > 0 for hits in calls)  # later turns: the policy is shown instance 1's hit
