"""What `pdserve plan` writes deploys as planned: node types from cluster.yaml, engine sized from the
hardware, a CPU profile gives a CPU deployment, and the plan file replays what was planned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pdserve.cli import main
from pdserve.config import SLOConfig
from pdserve.config import ServingConfig
from pdserve.placement.candidates import PhaseConfig
from pdserve.placement.cluster_file import load_cluster_file
from pdserve.placement.deploy import kv_cache_memory_gb
from pdserve.placement.hardware import ClusterSpec, load_gpu
from pdserve.placement.model_spec import load_model
from pdserve.placement.plan import Plan
from pdserve.placement.roofline import Roofline
from pdserve.placement.search import SearchSpec, phase_latencies
from pdserve.placement.workload import load_workload, planning_tokenizer, sharegpt_like

REPO_CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def _plan(tmp_path: Path, *extra: str, model: str = "llama-3-8b") -> tuple[int, ServingConfig, Plan]:
    out = tmp_path / "serving.yaml"
    rc = main(["plan", "--model", model, "--ttft", "1s", "--tpot", "100ms", "--num-requests", "200",
               "--jobs", "1", "-o", str(out), *extra])
    return rc, ServingConfig.load(out), Plan.from_yaml((tmp_path / "serving.plan.yaml").read_text())


def test_cluster_yaml_node_types_pin_pools_and_size_the_kv_cache(tmp_path, capsys):
    cf = load_cluster_file(REPO_CLUSTER)
    assert cf.phase_split and {t.name for t in cf.node_types} == {"prefill_gpu", "decode_gpu"}
    cluster = cf.cluster(None, 100.0, None)
    assert (cluster.num_nodes, cluster.gpus_per_node, cluster.prefill_nodes, cluster.gpu.name) == (8, 8, 4, "a100-80g")
    rc, cfg, plan = _plan(tmp_path, "--cluster", str(REPO_CLUSTER))
    assert rc == 0 and cfg.mode == "disaggregated"  # phases on their own node types: never colocated on one
    assert cfg.prefill.resources == {"prefill_gpu_node": 1.0} and cfg.decode.resources == {"decode_gpu_node": 1.0}
    assert cfg.prefill.num_gpus == cfg.decode.num_gpus == 1.0 and cfg.prefill.num_cpus == 12.0  # 96 CPUs / 8 GPUs
    model, gpu = load_model("llama-3-8b"), load_gpu("a100-80g")
    want = min(kv_cache_memory_gb(model, gpu, PhaseConfig(p.tp, p.pp), 4096, 512) for p in (cfg.prefill, cfg.decode))
    assert cfg.engine.kv_cache_memory_gb == want and 55 < want < 66  # 80 GiB × 0.95 − 16 GB weights − activations
    assert cfg.engine.dtype == "bfloat16" and cfg.engine.device == "cuda" and cfg.engine.max_model_len == 2048
    assert (cfg.prefill.max_num_seqs, cfg.prefill.max_num_batched_tokens) == (512, 4096)
    assert cfg.kvtransfer.transport == "torch"
    # Algorithm 1 on split node types: prefill segments on nodes 0-3, decode on 4-7
    assert all((seg.node < 4) == (seg.role == "prefill") for seg in plan.placement)
    assert plan.planned_for["cluster"]["cluster_file"] == str(REPO_CLUSTER)


def test_cpu_profile_plans_a_cpu_deployment(tmp_path, capsys):
    entry = {"prefill": [20.0, 0.5, 1e-5], "decoding_smallbs": [15.0, 1e-4, 2.0], "decoding_largebs": [15.0, 1e-4, 2.0],
             "decoding_large_small_bs_threshold": 95, "device": "cpu"}
    prof = tmp_path / "cpu.json"
    prof.write_text(json.dumps({"HuggingFaceTB/SmolLM2-135M-Instruct": {"1": entry}}))
    rc, cfg, plan = _plan(tmp_path, "--profile", str(prof), "--nodes", "1", "--gpus-per-node", "2", "--affinity", "high",
                          model="smollm2-135m")
    assert cfg.prefill.num_gpus == cfg.decode.num_gpus == 0.0
    assert cfg.engine.device == "cpu" and cfg.engine.dtype == "float32" and cfg.kvtransfer.transport == "grpc"
    assert plan.planned_for["hardware"]["name"] == "cpu"
    assert cfg.model == "smollm2-135m" and plan.model_note == ""  # shipped with pdserve: servable as named


def test_plan_file_replays_what_was_planned(tmp_path, capsys):
    rc, cfg, plan = _plan(tmp_path, "--gpu", "h100", "--nodes", "1", "--gpus-per-node", "2", "--seed", "3")
    capsys.readouterr()
    assert main(["simulate", str(tmp_path / "serving.plan.yaml"), "--rate", str(plan.goodput_rps)]) == 0
    out = capsys.readouterr().out
    assert " h100 (roofline-h100), workload sharegpt-like" in out
    joint = float(out.strip().splitlines()[-1].split()[1].rstrip("%"))
    assert joint >= 90.0  # the planned rate meets the planned attainment
    assert plan.planned_for["workload"]["seed"] == 3 and plan.explain["winner"]["bottleneck"]


def test_plan_only_models_say_so(tmp_path, capsys):
    out = tmp_path / "s.yaml"
    main(["plan", "--model", "opt-13b", "--ttft", "250ms", "--tpot", "0.1", "--nodes", "1", "--gpus-per-node", "2",
          "--num-requests", "200", "--jobs", "1", "-o", str(out), "--no-colocated"])
    assert "plan-only" in capsys.readouterr().out
    plan = yaml.safe_load((tmp_path / "s.plan.yaml").read_text())["plan"]
    assert plan["model"] == "facebook/opt-13b" and "plan-only" in plan["model_note"]


def test_named_workloads_are_benchs(tmp_path):
    w = load_workload("humaneval", "smollm2-135m", 2048)
    assert w.name == "humaneval" and len(w.prompt_lens) == 164 and 50 < w.mean_prompt_len < 400
    with pytest.raises(ValueError, match="--workload.*sharegpt-like, sharegpt, humaneval, longbench"):
        load_workload("sharegpt-ish")


def test_duration_units_and_link_units(tmp_path, capsys):
    rc, cfg, plan = _plan(tmp_path, "--gpu", "h100", "--nodes", "2", "--gpus-per-node", "2", "--no-colocated",
                          "--affinity", "low", "--inter-node-gbps", "400", "--intra-node-gbps", "800")
    assert cfg.slo.ttft_s == 1.0 and cfg.slo.tpot_s == pytest.approx(0.1)
    assert plan.planned_for["cluster"]["intra_node_gbps"] == 100.0  # 800 Gbit/s = 100 GB/s
    with pytest.raises(SystemExit):
        main(["plan", "--model", "llama-3-8b", "--ttft", "soon", "--tpot", "1"])
    assert "not a duration: 'soon'" in capsys.readouterr().err


def test_heterogeneous_pools_run_on_their_own_gpus(tmp_path, capsys):
    """H100 prefill nodes, A100 decode nodes: each pool's instances, bounds and KV memory use their GPU."""
    rc, cfg, plan = _plan(tmp_path, "--gpu", "h100", "--decode-gpu", "a100-80g", "--nodes", "2", "--prefill-nodes", "1",
                          "--gpus-per-node", "4", "--no-colocated")
    out = capsys.readouterr().out
    assert rc == 0 and plan.planned_for["decode_hardware"]["name"] == "a100-80g"
    assert all((seg.node == 0) == (seg.role == "prefill") for seg in plan.placement)
    assert "$/h" in out and "req/$" in out
    cluster = ClusterSpec(num_nodes=2, gpus_per_node=4, gpu=load_gpu("h100"), decode_gpu=load_gpu("a100-80g"),
                          prefill_nodes=1)
    spec = SearchSpec(model=load_model("llama-3-8b"), cluster=cluster, source=Roofline(gpu=cluster.gpu),
                      decode_source=Roofline(gpu=cluster.decode_gpu), workload=sharegpt_like(1000), slo=SLOConfig(1.0, 0.1))
    p, d = phase_latencies(spec, spec.source)[PhaseConfig(1, 1)], phase_latencies(spec, spec.decode_source, "decode")[PhaseConfig(1, 1)]
    # an A100 decode step reads the weights at 2.0 TB/s, an H100's at 3.35 TB/s
    assert d.profile.decode_s(64 * 800, 64) > 1.4 * p.profile.decode_s(64 * 800, 64)
    assert cluster.price_per_hour(4, 4) == pytest.approx(4 * 12.29 + 4 * 5.12)
    with pytest.raises(ValueError, match="decode_gpu"):
        ClusterSpec(num_nodes=2, gpus_per_node=4, gpu=load_gpu("h100"), decode_gpu=load_gpu("a100-80g"))


def test_named_workloads_are_counted_in_the_planned_models_tokens_or_say_whose(tmp_path):
    assert planning_tokenizer("smollm2-135m") == ("smollm2-135m", None)
    assert planning_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")[1] is None
    assert planning_tokenizer("opt-66b", "/some/tokenizer.json") == ("/some/tokenizer.json", None)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert planning_tokenizer(str(tmp_path)) == (str(tmp_path), None)  # an HF directory with its tokenizer
    tok, note = planning_tokenizer("opt-66b")  # plan-only: no OPT tokenizer ships with pdserve
    assert tok == "smollm2-135m" and "opt-66b's tokenizer is not available" in note and "--tokenizer" in note
