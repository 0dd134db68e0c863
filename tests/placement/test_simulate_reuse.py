"""`pdserve simulate` of a serving config with reuse settings (prefix caching, cache-aware routing,
conditional disaggregation) simulates what that config serves, through the mapping the mode search
writes with (placement/reuse_settings.py); and the config written for a conditional winner loads
back into the deployment that was simulated."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.bench.lengths import RequestLengths as R, write_lengths
from pdserve.cli import main
from pdserve.config import EngineConfig, PoolConfig, RouterConfig, ServingConfig
from pdserve.placement.modes import candidates, compare_modes
from pdserve.placement.modes_cli import reuse_plan, scored
from pdserve.placement.plan import Plan
from pdserve.placement.reuse_settings import ReuseSettings
from pdserve.placement.search import SearchSpec, job_trace, search_trace
from pdserve.placement.simulate_cli import serving_deployment
from pdserve.placement.simulator import simulation
from pdserve.placement.workload import load_lengths
from tests.placement.test_modes import chat_sessions, spec_for

PLAIN = ServingConfig(model="opt-13b", prefill=PoolConfig(instances=1), decode=PoolConfig(instances=1))
REUSE = PLAIN.replace(engine=EngineConfig(enable_prefix_caching=True),
                      router=RouterConfig(prefill_policy="cache_aware", decode_policy="cache_aware",
                                          pd_threshold_tokens=64),
                      decode=PoolConfig(instances=1, max_num_batched_tokens=256))
FLAGS = ["--model", "opt-13b", "--profile", "distserve-a100", "--gpu", "a100-80g", "--nodes", "1", "--gpus-per-node",
         "2", "--num-requests", "200"]


def run(spec: SearchSpec, cfg: ServingConfig, rate: float):
    dep = serving_deployment(spec, cfg)
    sim = simulation(dep, job_trace(spec, dep, search_trace(spec)), rate)
    return sim.run(), sim


def single_turn(tmp_path: Path) -> Path:
    rng = random.Random(1)
    path = tmp_path / "single.jsonl"
    write_lengths(path, [R(rng.randint(200, 1500), rng.randint(20, 300)) for _ in range(300)])
    return path


def test_the_deployment_carries_the_configs_reuse_settings(tmp_path: Path) -> None:
    spec = spec_for(load_lengths(chat_sessions(tmp_path / "mt.jsonl", num=60)))
    plain, reuse = serving_deployment(spec, PLAIN), serving_deployment(spec, REUSE)
    assert not plain.models_reuse
    assert (reuse.prefix_caching, reuse.cache_aware, reuse.pd_threshold_tokens, reuse.chunk_size) == (True, True, 64, 256)
    assert reuse.prefill == plain.prefill and reuse.decode == plain.decode


def test_a_config_with_reuse_predicts_differently_on_sessions(tmp_path: Path) -> None:
    spec = spec_for(load_lengths(chat_sessions(tmp_path / "mt.jsonl", num=60)))
    (plain, sp), (reuse, sr) = run(spec, PLAIN, 2.0), run(spec, REUSE, 2.0)
    assert sp.stats.hit_rate == 0.0 and sr.stats.hit_rate > 0.5
    assert sr.stats.num_local > 0 and sp.stats.num_local == 0  # the conditional decider prefilled some locally
    assert sr.stats.pulled_tokens < 0.5 * sp.stats.pulled_tokens  # delta pulls
    assert reuse.percentiles()["ttft_p50"] < 0.8 * plain.percentiles()["ttft_p50"]


def test_on_a_single_turn_workload_reuse_predicts_the_same(tmp_path: Path) -> None:
    spec = spec_for(load_lengths(single_turn(tmp_path)))
    (plain, _), (reuse, sr) = run(spec, PLAIN, 1.0), run(spec, REUSE.replace(router=RouterConfig(
        prefill_policy="cache_aware", decode_policy="cache_aware")), 1.0)
    assert sr.stats.hit_rate == 0.0
    assert reuse.attainment(0.4, 0.1) == pytest.approx(plain.attainment(0.4, 0.1), abs=0.02)
    for k, v in plain.percentiles().items():
        assert reuse.percentiles()[k] == pytest.approx(v, rel=0.05), k


def test_pdserve_simulate_reports_the_reuse_it_simulated(tmp_path: Path, capsys) -> None:
    lengths = chat_sessions(tmp_path / "mt.jsonl", num=60)
    out = {}
    for name, cfg in (("plain", PLAIN), ("reuse", REUSE)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(cfg.to_yaml())
        assert main(["simulate", str(path), *FLAGS, "--workload", str(lengths), "--rates", "2"]) == 0
        out[name] = capsys.readouterr().out
    assert "no prefix reuse" in out["plain"]
    assert "prefix caching, cache-aware routing, conditional disaggregation (threshold 64" in out["reuse"]
    assert "local chunks of 256 tokens" in out["reuse"]
    assert out["plain"].splitlines()[-1] != out["reuse"].splitlines()[-1]


def test_a_policy_the_simulator_does_not_model_is_a_clear_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "rr.yaml"
    path.write_text(PLAIN.replace(router=RouterConfig(decode_policy="round_robin")).to_yaml())
    assert main(["simulate", str(path), *FLAGS, "--workload", str(single_turn(tmp_path)), "--rates", "1"]) == 2
    assert "router.decode_policy: round_robin" in capsys.readouterr().err
    with pytest.raises(ValueError, match="both pools or on neither"):
        ReuseSettings.of_serving(REUSE.replace(router=RouterConfig(prefill_policy="cache_aware")))


def test_the_config_written_for_a_conditional_winner_deploys_what_was_simulated(tmp_path: Path) -> None:
    spec = replace(spec_for(load_lengths(chat_sessions(tmp_path / "mt.jsonl", num=60))), decode_token_limit=20_000)
    e = compare_modes(spec, thresholds=(64, 256), chunk_size=128).best("e")
    plan = reuse_plan(Plan.from_scored(scored(e, spec), spec), e, spec)
    path = tmp_path / "serving.yaml"
    path.write_text(plan.serving_config().to_yaml())
    cfg = ServingConfig.load(path)
    assert cfg.mode == "disaggregated" and cfg.engine.enable_prefix_caching
    assert (cfg.router.prefill_policy, cfg.router.decode_policy) == ("cache_aware", "cache_aware")
    assert cfg.router.pd_threshold_tokens == e.threshold and cfg.router.pd_prefill_queue_limit is None
    assert cfg.decode.max_num_batched_tokens == 128  # decodes + a local chunk per step, as simulated
    assert cfg.prefill.max_num_batched_tokens == spec.prefill_token_budget
    assert (cfg.prefill.instances, cfg.decode.instances) == e.num_instances
    assert (cfg.prefill.tp, cfg.prefill.pp, cfg.decode.tp, cfg.decode.pp) == (e.unit.prefill.tp, e.unit.prefill.pp,
                                                                              e.unit.decode.tp, e.unit.decode.pp)
    assert cfg.decode.max_num_seqs == spec.max_num_seqs
    # each engine's KV pool: the 20,000 tokens the simulated prefix caches held (OPT-13B bf16: 819,200 B a token)
    assert cfg.engine.gpu_memory_utilization is None
    assert int(cfg.engine.kv_cache_memory_gb * 1e9) // (819_200 * 16) * 16 == 20_000
    assert ReuseSettings.of_serving(cfg) == e.settings
    simulated = [dep for m, dep in candidates(spec, e.unit.prefill, [e.num_instances], (e.threshold,), 2, 128)
                 if m.system == "e"]
    assert serving_deployment(spec, cfg) == simulated[0]


def test_pdserve_simulate_of_the_written_plan_replays_the_winner_at_its_goodput(tmp_path: Path, capsys) -> None:
    lengths = chat_sessions(tmp_path / "mt.jsonl", num=60)
    out, js = tmp_path / "serving.yaml", tmp_path / "modes.json"
    assert main(["plan", *FLAGS, "--workload", str(lengths), "--ttft", "0.4", "--tpot", "0.1", "--jobs", "1",
                 "--pd-thresholds", "64", "--chunk-size", "128", "-o", str(out), "--json", str(js)]) == 0
    capsys.readouterr()
    win = json.loads(js.read_text())["ranking"][0]
    assert main(["simulate", str(tmp_path / "serving.plan.yaml"), "--rates", str(win["goodput_rps"])]) == 0
    text = capsys.readouterr().out
    assert "workload mt," in text and "prefix caching, cache-aware routing" in text  # the lengths file, by its path
    joint = float(text.splitlines()[-1].split()[1].rstrip("%")) / 100
    assert joint >= 0.9  # the planned goodput meets the SLOs when the plan is replayed
