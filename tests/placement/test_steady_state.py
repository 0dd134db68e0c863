"""Goodput is a steady-state rate: below the hardware's bound, stable when the trace grows, and
still met when the winner runs ten times as many requests; every candidate the search evaluates
is one the engine can serve; one-token outputs are fine."""

from __future__ import annotations

import pytest

from pdserve.config import SLOConfig
from pdserve.placement.bound import hardware_bound, service_bound
from pdserve.placement.candidates import PhaseConfig, Unit
from pdserve.placement.goodput import MAX_LOAD, attained, counted, goodput, steady_len
from pdserve.placement.hardware import ClusterSpec, load_gpu
from pdserve.placement.latency import kv_capacity_tokens
from pdserve.placement.model_spec import ModelSpec, load_model
from pdserve.placement.roofline import Roofline
from pdserve.placement.search import SearchSpec, _phase_deployment, phase_latencies, search, unit_deployment
from pdserve.placement.simulator import simulate
from pdserve.placement.workload import WorkloadLengths, sharegpt_like

H100 = load_gpu("h100")


def spec_for(model: str, nodes: int, per_node: int, ttft: float, tpot: float, **kw) -> SearchSpec:
    cluster = ClusterSpec(num_nodes=nodes, gpus_per_node=per_node, gpu=H100)
    return SearchSpec(model=load_model(model), cluster=cluster, source=Roofline(gpu=H100),
                      workload=kw.pop("workload", sharegpt_like(4000)), slo=SLOConfig(ttft_s=ttft, tpot_s=tpot), **kw)


@pytest.fixture(scope="module")
def small_search():
    spec = spec_for("llama-3-8b", 1, 4, 0.5, 0.05, num_requests=500, affinity="high", include_colocated=False)
    return spec, search(spec)


def test_phase_and_joint_goodput_below_the_hardware_bound(small_search):
    spec, result = small_search
    trace = spec.workload.trace(20_000, spec.seed)
    lat = phase_latencies(spec, spec.source)
    for (role, cfg), g in result.phase_goodput.items():
        dep = _phase_deployment(spec, role, lat[cfg])
        assert g <= hardware_bound(dep, trace.head(steady_len(dep, trace, spec.num_requests)), spec.model, H100)
    for s in result.ranked:
        dep = unit_deployment(spec, s.unit, lat)
        assert s.unit_goodput <= hardware_bound(dep, trace, spec.model, H100)


def test_llama70b_decode_tp4_pp4_is_not_limitless():
    """The issue's case: decode TP4×PP4 of Llama-3-70B on H100s looked like 84,480 req/s."""
    spec = spec_for("llama-3-70b", 2, 8, 1.0, 0.1)
    trace = spec.workload.trace(20_000, 0)
    dep = _phase_deployment(spec, "decode", phase_latencies(spec, spec.source)[PhaseConfig(4, 4)])
    trace = trace.head(steady_len(dep, trace, 1000))
    bound = hardware_bound(dep, trace, spec.model, H100)
    g = goodput(dep, trace, spec.slo, "tpot", max_rate=bound)
    # 16 H100s at full FLOPs: 16 × 989 TFLOP/s ÷ 2·70.6e9 FLOP/token ÷ ~199 tokens ≈ 560 req/s
    assert 0 < g <= MAX_LOAD * service_bound(dep, trace) and bound < 600 and g < bound


def test_goodput_stable_when_the_trace_doubles_and_ten_times_longer_still_meets_it(small_search):
    spec, result = small_search
    best = result.best
    dep = unit_deployment(spec, best.unit, phase_latencies(spec, spec.source))
    long = spec.workload.trace(40_000, spec.seed)
    n = steady_len(dep, long, spec.num_requests)
    g1, g2 = goodput(dep, long.head(n), spec.slo), goodput(dep, long.head(2 * n), spec.slo)
    assert g1 == pytest.approx(best.unit_goodput, rel=1e-9)
    assert abs(g2 - g1) < 0.05 * g1
    assert attained(spec.slo, counted(simulate(dep, long.head(10 * n), best.unit_goodput))) >= spec.slo.attainment


def test_one_token_outputs_never_crash():
    w = WorkloadLengths("short", (100, 700, 50, 300), (1, 40, 1, 120))
    spec = spec_for("llama-3-8b", 1, 2, 1.0, 0.1, workload=w, num_requests=200)
    result = search(spec)
    assert result.best is not None and result.best.unit_goodput > 0
    lat = phase_latencies(spec, spec.source)
    dep = _phase_deployment(spec, "decode", lat[PhaseConfig(1, 1)])
    res = simulate(dep, w.trace(200, 0), 5.0)
    assert all(t == 0.0 for t, o in zip(res.tpot_s, w.trace(200, 0).output_lens) if o == 1)


def test_every_evaluated_candidate_is_servable():
    """9 attention heads, 3 KV heads on 9-GPU nodes: TP9 and TP3... only where the engine splits."""
    from pdserve.engine.tp import check_tp

    model = ModelSpec(name="odd", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3,
                      intermediate_size=1536, vocab_size=49152, max_model_len=2048)
    gpu = load_gpu("l4")
    cluster = ClusterSpec(num_nodes=2, gpus_per_node=9, gpu=gpu)
    spec = SearchSpec(model=model, cluster=cluster, source=Roofline(gpu=gpu), workload=sharegpt_like(2000),
                      slo=SLOConfig(ttft_s=1.0, tpot_s=0.1), num_requests=200, verify_top_k=2)
    result = search(spec)
    configs = {c for _, c in result.phase_goodput} | {c for s in result.ranked for c in (s.unit.prefill, s.unit.decode) if c}
    assert configs and {c.tp for c in configs} <= {1, 3}
    for c in configs:
        check_tp(model.num_heads, model.num_kv_heads, model.intermediate_size, c.tp)  # raises if not
        assert model.num_layers % c.pp == 0
        assert kv_capacity_tokens(model, gpu, c.tp, c.pp) >= spec.max_model_len
    with pytest.raises(ValueError):
        check_tp(9, 3, 1536, 9)
    assert not model.valid_tp(9)


def test_weights_that_leave_no_room_for_one_request_are_not_candidates():
    spec = spec_for("llama-3-70b", 1, 8, 1.0, 0.1)
    configs = phase_latencies(spec, spec.source)
    assert PhaseConfig(1, 1) not in configs and PhaseConfig(2, 1) in configs  # 141 GB: 2 × 80 GB holds it
    assert Unit(algorithm="colocated", prefill=PhaseConfig(2, 1)).num_gpus == 2
