"""`pdserve plan` and `pdserve simulate` end to end (small, fast settings)."""

from __future__ import annotations

import pytest

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


def test_profile_from_a_serving_step_log(tmp_path, capsys):
    import json
    import random

    from pdserve.placement.latency import Coeffs, PhaseProfile
    from pdserve.placement.model_spec import load_model
    from pdserve.placement.profile_file import load_profile

    truth = PhaseProfile(prefill=Coeffs(0.07, 2.6e-3, 5e-7), decode_small=Coeffs(0.05, 1.2e-5, 8e-3),
                         decode_large=Coeffs(0.05, 1.2e-5, 8e-3))
    rng, lines = random.Random(0), []
    for i in range(200):
        if i % 4 == 0:
            new = [rng.randint(4, 500) for _ in range(rng.randint(1, 3))]
            cached, d = [0] * len(new), truth.prefill_s(sum(new), sum(n * n for n in new))
        elif i % 4 == 3:  # a chunk of 32 prompt tokens on 64 cached, next to one decode
            new, cached = [1, 32], [40, 64]
            d = truth.decode_s(41, 1) + truth.prefill.b * 32 + truth.prefill.c * 32 * (2 * 64 + 32)
        else:
            ctx = [rng.randint(10, 600) for _ in range(rng.randint(1, 6))]
            new, cached, d = [1] * len(ctx), [c - 1 for c in ctx], truth.decode_s(sum(ctx), len(ctx))
        lines.append(json.dumps({"worker": "w", "rate": 1.0, "start_s": float(i), "duration_s": d,
                                 "new": new, "cached": cached}))
    steps = tmp_path / "steps.jsonl"
    steps.write_text("\n".join(lines) + "\n")
    out = tmp_path / "insitu.json"
    assert main(["profile", "--from-steps", str(steps), "-o", str(out)]) == 0
    assert "200 steps: 50 prefill, 100 decode, 50 mixed\n" in capsys.readouterr().err
    prof = load_profile(str(out)).profile(load_model("smollm2-135m"), 1)
    assert prof.prefill_s(700, 300_000) == pytest.approx(truth.prefill_s(700, 300_000), rel=1e-6)
    assert prof.decode_s(1500, 5) == pytest.approx(truth.decode_s(1500, 5), rel=1e-6)
    # Past batch 6 (the largest served), a grid profile's curve, flatter than the linear fit, at
    # twice the served time where both were measured: halved
    from pdserve.placement.latency import Curve
    from pdserve.placement.profile_file import profile_to_json

    batches = (1, 2, 4, 6, 8, 16, 32)
    base = [truth.decode_s(0, b) for b in batches[:4]] + [0.11, 0.15, 0.2]
    shape = PhaseProfile(prefill=truth.prefill, decode_small=truth.decode_small, decode_large=truth.decode_large,
                         decode_batch=Curve(batches, tuple(2 * y for y in base), 3e-5))
    (tmp_path / "grid.json").write_text(json.dumps(profile_to_json({"HuggingFaceTB/SmolLM2-135M-Instruct": {1: shape}})))
    assert main(["profile", "--from-steps", str(steps), "-o", str(out), "--decode-shape", str(tmp_path / "grid.json")]) == 0
    prof = load_profile(str(out)).profile(load_model("smollm2-135m"), 1)
    assert prof.decode_s(1500, 16) == pytest.approx(0.15 + 1500 * truth.decode_small.b, rel=1e-6)
    assert truth.decode_s(1500, 16) > 0.15 + 1500 * truth.decode_small.b + 0.02  # what the linear fit says
    steps.write_text('{"worker": "w", "start_s": 1}\n')
    assert main(["profile", "--from-steps", str(steps), "-o", str(out)]) == 2
    assert "steps.jsonl:1: not a step record" in capsys.readouterr().err
