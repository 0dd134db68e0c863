"""`pdserve plan` and `pdserve simulate` end to end (small, fast settings)."""

from __future__ import annotations

from pdserve.cli import main
from pdserve.config import ServingConfig
from pdserve.placement.plan import Plan


def test_plan_then_simulate(tmp_path, capsys):
    out, plan_out = tmp_path / "serving.yaml", tmp_path / "plan.yaml"
    lengths = tmp_path / "lengths.jsonl"
    lengths.write_text("".join(f'{{"prompt_len": {100 + 37 * i % 900}, "output_len": {20 + 13 * i % 200}}}\n'
                               for i in range(200)))
    argv = ["plan", "--model", "llama-3-8b", "--gpu", "l4", "--nodes", "1", "--gpus-per-node", "2",
            "--workload", str(lengths), "--ttft", "1.0", "--tpot", "0.06", "--num-requests", "200",
            "--jobs", "1", "-o", str(out), "--plan-output", str(plan_out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "goodput" in text and "wrote" in text
    cfg = ServingConfig.load(out)
    plan = Plan.from_yaml(plan_out.read_text())
    assert cfg.mode == plan.mode and plan.num_gpus <= 2
    assert main(["simulate", str(out), "--gpu", "l4", "--model", "llama-3-8b", "--rates", "0.5,2",
                 "--workload", str(lengths), "--num-requests", "200"]) == 0
    assert "joint" in capsys.readouterr().out


def test_plan_reports_impossible_slo(tmp_path, capsys):
    argv = ["plan", "--model", "llama-3-8b", "--gpu", "l4", "--nodes", "1", "--gpus-per-node", "1",
            "--ttft", "0.001", "--tpot", "0.001", "--num-requests", "100", "--jobs", "1", "-o", str(tmp_path / "s.yaml")]
    assert main(argv) == 1
    assert "no configuration meets the SLOs" in capsys.readouterr().out


def test_unknown_model_is_a_clean_error(capsys):
    assert main(["plan", "--model", "gpt-9", "--ttft", "1", "--tpot", "1"]) == 2
    assert "unknown 'gpt-9'" in capsys.readouterr().err
