"""The `pdserve` command: every subcommand is wired, and config errors name the field (exit 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pdserve.cli import build_parser, main


def test_every_subcommand_is_registered_without_loading_torch_or_ray() -> None:
    for mod in [m for m in sys.modules if m.startswith(("pdserve.engine", "pdserve.placement.launch"))]:
        del sys.modules[mod]
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"serve", "demo", "plan", "simulate", "profile", "bench", "chaos"}
    assert "pdserve.engine.engine" not in sys.modules


def test_serve_with_a_bad_config_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("decode:\n  tp: two\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "decode.tp" in capsys.readouterr().err
    cfg.write_text("prefil:\n  instances: 2\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "prefil" in capsys.readouterr().err
