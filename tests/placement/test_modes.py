"""`pdserve plan` on multi-turn workloads: the mode ranking, the threshold, and the written config,
on DistServe's published A100 profile (OPT-13B)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pdserve.bench.lengths import RequestLengths as R, write_lengths
from pdserve.cli import main
from pdserve.config import ServingConfig, SLOConfig
from pdserve.placement.hardware import ClusterSpec, load_gpu
from pdserve.placement.model_spec import load_model
from pdserve.placement.modes import SYSTEMS, compare_modes
from pdserve.placement.profile_file import load_profile
from pdserve.placement.search import SearchSpec
from pdserve.placement.workload import WorkloadLengths, load_lengths


def chat_sessions(path: Path, num: int = 120, system_len: int = 1024, seed: int = 0) -> Path:
    """Chat sessions behind one long system prompt: 2–6 turns, each adding the answer and a new message."""
    rng, items = random.Random(seed), []
    for s in range(num):
        p = system_len + rng.randint(20, 300)
        for k in range(rng.randint(2, 6)):
            o = rng.randint(20, 300)
            items.append(R(p, o, session=s, turn=k, shared_prefix_len=system_len, think_time_s=rng.uniform(1, 5)))
            p += o + rng.randint(20, 200)
    write_lengths(path, items)
    return path


def spec_for(workload: WorkloadLengths, gpus: int = 2) -> SearchSpec:
    gpu = load_gpu("a100-80g")
    return SearchSpec(model=load_model("opt-13b"), cluster=ClusterSpec(num_nodes=1, gpus_per_node=gpus, gpu=gpu),
                      source=load_profile("distserve-a100"), workload=workload,
                      slo=SLOConfig(ttft_s=0.4, tpot_s=0.1), num_requests=300)


def test_plan_ranks_the_modes_and_reuse_wins_on_a_multi_turn_workload(tmp_path: Path) -> None:
    c = compare_modes(spec_for(load_lengths(chat_sessions(tmp_path / "mt.jsonl"))), thresholds=(32, 128, 512))
    ranking = c.ranking()
    assert sorted(r.system for r in ranking) == sorted(SYSTEMS)
    assert c.best("e").threshold in (32, 128, 512)
    assert c.winner.system != "a" and c.gain() > 1.5  # recomputing 1k-token histories every turn costs
    a, d = c.best("a"), c.best("d")
    assert d.per_gpu_goodput > 1.5 * a.per_gpu_goodput
    assert d.reuse["prefix_hit_rate"] > 0.6 and a.reuse["prefix_hit_rate"] == 0.0
    assert d.reuse["pulled_tokens_per_request"] < 0.5 * a.reuse["pulled_tokens_per_request"]


def test_without_anything_to_reuse_reuse_gains_nothing(tmp_path: Path) -> None:
    rng = random.Random(1)
    path = tmp_path / "single.jsonl"
    write_lengths(path, [R(rng.randint(200, 1500), rng.randint(20, 300)) for _ in range(300)])
    single = load_lengths(path)
    assert type(single) is WorkloadLengths
    c = compare_modes(spec_for(single), thresholds=(32,))
    a, d = c.best("a"), c.best("d")
    assert d.per_gpu_goodput == pytest.approx(a.per_gpu_goodput, rel=0.1)
    assert d.reuse["prefix_hit_rate"] == 0.0


def test_pdserve_plan_writes_the_winners_reuse_settings(tmp_path: Path, capsys) -> None:
    lengths = chat_sessions(tmp_path / "mt.jsonl", num=60)
    out, js = tmp_path / "serving.yaml", tmp_path / "modes.json"
    argv = ["plan", "--model", "opt-13b", "--profile", "distserve-a100", "--gpu", "a100-80g", "--nodes", "1",
            "--gpus-per-node", "2", "--workload", str(lengths), "--ttft", "0.4", "--tpot", "0.1",
            "--num-requests", "200", "--jobs", "1", "--pd-thresholds", "64", "256", "-o", str(out), "--json", str(js)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "winner:" in text and "conditional threshold chosen:" in text
    report = json.loads(js.read_text())
    assert [r["system"] for r in report["ranking"]] and report["gain_over_a"] > 1
    assert report["threshold"] in (64, 256)
    cfg = ServingConfig.load(str(out))
    win = report["ranking"][0]
    assert cfg.engine.enable_prefix_caching and cfg.router.decode_policy == "cache_aware"
    assert cfg.mode == ("colocated" if win["system"] in "bc" else "disaggregated")
    assert cfg.router.pd_threshold_tokens == (win["threshold"] or 0)


def test_the_mode_search_covers_every_tp_pp_both_pools_run(tmp_path: Path) -> None:
    c = compare_modes(spec_for(load_lengths(chat_sessions(tmp_path / "mt.jsonl", num=60)), gpus=4), thresholds=(64,))
    shapes = {(r.system, r.unit.prefill.tp, r.unit.prefill.pp) for r in c.results}
    assert {("a", 2, 1), ("d", 2, 1), ("e", 2, 1), ("b", 2, 1), ("c", 2, 1), ("a", 1, 2), ("d", 1, 2)} <= shapes
    assert not any(pp > 1 for s, _, pp in shapes if s in "bce")  # colocated engines and local prefills: pp = 1
    assert all(r.num_gpus <= 4 and (r.unit.decode is None or r.unit.decode == r.unit.prefill) for r in c.results)
    assert c.winner.per_gpu_goodput == max(r.per_gpu_goodput for r in c.results)
