"""The `pdserve` command: every subcommand is wired, and config errors name the field (exit 2)."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import pytest

import pdserve
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


def _subcommands() -> list[tuple[str, ...]]:
    """Every command path (`("bench", "compare")`, ...) under `pdserve`."""
    paths: list[tuple[str, ...]] = []

    def walk(parser, path: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    paths.append((*path, name))
                    walk(child, (*path, name))
    walk(build_parser(), ())
    return paths


# placement/cli.py (plan, simulate, profile) gets its help texts in issue 18; drop this once merged.
@pytest.mark.parametrize("path", _subcommands(), ids=" ".join)
def test_every_subcommand_help_exits_0_and_every_flag_explains_itself(
        path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0 and "usage: pdserve " + " ".join(path) in capsys.readouterr().out
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == [], f"pdserve {' '.join(path)}: flags without help"


def test_help_shows_defaults_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100)" in text and "(default: /v1/completions)" in text  # -n, --endpoint
    assert "OPENAI_API_KEY" in text and "(default: None)" not in text
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"pdserve {pdserve.__version__}"


@pytest.mark.parametrize("argv, message", [
    (["serve", "--config", "/nonexistent/plan.yaml"], "/nonexistent/plan.yaml: No such file or directory"),
    (["profile", "--from-steps", "/nonexistent/*/steps.jsonl"], "no file matches this pattern"),
    (["simulate", "/nonexistent.yaml", "--rate", "1"], "/nonexistent.yaml: No such file or directory"),
    (["bench", "compare", "/"], "not a pdserve bench results directory"),
])
def test_user_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_serve_refuses_a_busy_port_before_starting_anything(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import pdserve.serve

    def no_ray(*args: object) -> None:
        raise AssertionError("Ray was started for a port that cannot be served")
    monkeypatch.setattr(pdserve.serve, "ray_session", no_ray)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"router.port: cannot listen on 127.0.0.1:{port}" in err and len(err.splitlines()) == 1


def test_no_cluster_is_one_line() -> None:
    from pdserve.cli import describe

    e = ConnectionError("Could not find any running Ray instance. Please specify the one to connect to ...")
    assert describe(e).startswith("no Ray cluster found at --address auto")
    assert describe(RuntimeError("remote traceback\n  File x\nValueError: the real reason\n")) == \
        "ValueError: the real reason"
