"""The README's "Using it" section, run as a new user would: every fenced command and code block
against one real `pdserve serve` (started as the README says, on a free port), with small sizes and
temporary paths substituted, each checked for exit status 0 and the output shape it documents. The
serving-config block must be exactly the defaults, field for field."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pdserve.cli import build_parser
from pdserve.config import ServingConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Shell lines of a block, continuations joined, comments dropped, split as the shell would."""
    joined = block.replace("\\\n", " ")
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


USING = section("Using it")
CLI = [argv for b in blocks(USING, "bash") for argv in commands(b)]


def test_the_serving_config_example_is_every_field_with_its_default() -> None:
    (example,) = blocks(section("Using it"), "yaml")
    data = yaml.safe_load(example)

    def keys(d: dict, prefix: str = "") -> set[str]:
        return {f"{prefix}{k}" for k in d} | {x for k, v in d.items() if isinstance(v, dict) and v
                                               for x in keys(v, f"{prefix}{k}.")}
    assert keys(data) == keys(ServingConfig().to_dict())
    assert ServingConfig.from_dict(data) == ServingConfig()


def test_every_readme_command_parses() -> None:
    assert [argv[0] for argv in CLI] == ["pdserve"] * len(CLI) and len(CLI) >= 9
    for argv in CLI:
        build_parser().parse_args(argv[1:])  # SystemExit(2) on a flag that does not exist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`pdserve serve` as the README's first command, on a free port; SIGTERM must end it cleanly."""
    assert CLI[0] == ["pdserve", "serve"]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--port", str(_free_port())],
                                stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not (m := re.search(r"ready at (http://\S+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield m.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 0 and "pdserve: shutting down" in text, text
    assert "Traceback" not in text and "Fatal Python error" not in text and "*** SIGTERM" not in text, text
    assert "constructor arguments in the object store" not in text, text  # a router restart could fail (ray#53727)


def _run(argv: list[str], cwd: Path, timeout_s: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", *argv[1:]], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _swap(argv: list[str], flag: str, *values: str) -> list[str]:
    """`argv` with `flag`'s values replaced (or the flag added)."""
    if flag not in argv:
        return [*argv, flag, *values]
    i = argv.index(flag)
    j = i + 1
    while j < len(argv) and not argv[j].startswith("-"):
        j += 1
    return [*argv[:i + 1], *values, *argv[j:]]


def _write_steps(path: Path) -> None:
    """A step log shaped like a deployment's (benchmarks/headline.py): prefill, decode and mixed steps."""
    path.parent.mkdir(parents=True)
    lines = []
    for i in range(60):
        if i % 3 == 0:
            new = [16 + 8 * (i % 7), 24]
            row = {"new": new, "cached": [0, 0], "duration_s": 0.002 + 1e-5 * sum(new)}
        else:
            ctx = [40 + 10 * (i % 5)] * (1 + i % 4)
            row = {"new": [1] * len(ctx), "cached": [c - 1 for c in ctx], "duration_s": 0.001 + 1e-6 * sum(ctx)}
        lines.append(json.dumps({"worker": "decode-0", "rate": 1.0, "start_s": float(i), **row}))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.ray
@pytest.mark.slow
def test_every_using_it_command_runs(server: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    ran = 0
    for argv in CLI[1:]:
        cmd = argv[1]
        if "--address" in argv:  # needs a cluster; the plan it serves is checked below
            continue
        if cmd == "plan":
            argv = _swap(argv, "--num-requests", "300")
            out = _run(argv, tmp_path)
            written = ServingConfig.load(tmp_path / argv[argv.index("-o") + 1])
            assert "searched" in out and "wins" in out and written.mode in ("disaggregated", "colocated")
        elif cmd == "simulate":
            out = _run(argv, tmp_path)
            rows = [ln.split() for ln in out.splitlines() if re.match(r"\s+\d+\.\d+\s+\d+\.\d+%", ln)]
            assert [r[0] for r in rows] == ["2.000", "4.000", "6.000"], out
        elif cmd == "profile" and "--from-steps" not in argv:  # the engine, measured: the tiny model, few shapes
            argv = [*argv, "--model", str(tiny_llama_dir), "--max-batch-tokens", "128", "--max-len", "64",
                    "--max-decode-tokens", "256", "--repeats", "1"]
            assert "wrote smollm2-cpu.json" in _run(argv, tmp_path)
        elif cmd == "profile":
            pattern = argv[argv.index("--from-steps") + 1]
            _write_steps(tmp_path / pattern.replace("*", "run1"))
            i = argv.index("--from-steps")  # the shell expands the glob
            argv = [*argv[:i + 1], *sorted(glob.glob(str(tmp_path / pattern))), *argv[i + 2:],
                    "--model", str(tiny_llama_dir)]
            out = _run(argv, tmp_path)
            assert "60 steps:" in out and "wrote insitu.json" in out
        elif cmd == "bench" and argv[2] == "compare":
            out = _run(argv, tmp_path)
            lines = out.splitlines()
            assert lines[0].split()[:2] == ["system", "GPUs"] and [ln.split()[0] for ln in lines[1:3]] == \
                ["disagg", "colocated"] and "SLO: TTFT <=" in out
            assert (tmp_path / "results/compare/compare.json").is_file()
        elif cmd == "bench":
            argv = _swap(argv, "--url", server)
            argv = _swap(_swap(_swap(argv, "-n", "4"), "--rate", "2", "4"), "--max-output-len", "8")
            for out_dir in ("results/disagg", "results/colocated"):  # the comment's second run, same server
                out = _run([*_swap(argv, "-o", out_dir), "--no-progress"], tmp_path)
                assert "GPUs: 2, as the server reports (disaggregated" in out and "goodput at 90%" in out
                assert json.loads((tmp_path / out_dir / "summary.json").read_text())["gpus"] == 2
        else:
            raise AssertionError(f"no check for README command {shlex.join(argv)}")
        ran += 1
    assert ran == len(CLI) - 2  # all but the two `serve` lines (the server itself, and the cluster one)


@pytest.mark.ray
@pytest.mark.slow
def test_the_python_examples_print_what_they_show(server: str) -> None:
    client_block, offline_block = blocks(USING, "python")
    out = _exec(client_block.replace("http://127.0.0.1:8000", server))
    assert "4" in out and "The answer" in out  # the comment's answer: greedy, complete
    out = _exec(offline_block).splitlines()
    assert out[0].strip() == "Paris." and "4" in out[1]


def _exec(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_the_grafana_dashboard_queries_exist_on_a_live_server(server: str) -> None:
    from tests.router.test_conventions import dashboard_metrics, exported_metrics

    _as_a_client_would("POST", f"{server}/v1/completions",
                       json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 2}, timeout=120)
    exported = exported_metrics(_as_a_client_would("GET", f"{server}/metrics", timeout=30).text)
    assert dashboard_metrics() - exported == set()
    assert "vllm:time_to_first_token_seconds_bucket" in exported and "vllm:kv_cache_usage_perc" in exported


def _as_a_client_would(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """The response, retried only as a client should: after a 503 that carries Retry-After (the
    router restarting, for at most a minute). A refused connection or any other error fails."""
    deadline = time.monotonic() + 60
    while True:
        r = httpx.request(method, url, **kwargs)
        if r.status_code != 503 or "retry-after" not in r.headers or time.monotonic() > deadline:
            return r.raise_for_status()
        time.sleep(float(r.headers["retry-after"]))
