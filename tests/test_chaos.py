"""The reduced chaos matrix (one fault per KV-transfer window) on the tiny model: every cell keeps
the invariants — exact greedy output or an explicit error, no hang, every KV block free again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.chaos import ChaosRig, cells_of, format_matrix, run_matrix
from pdserve.cli import main
from pdserve.kvtransfer.faults import KVFault


@pytest.mark.parametrize("transport", ["grpc", "loopback"])
def test_reduced_matrix_keeps_every_invariant(tiny_llama_dir: Path, transport: str) -> None:
    rig = ChaosRig(str(tiny_llama_dir), transport, timeout_s=1.0, lease_s=2.0)
    cells = run_matrix(rig, cells_of(reduced=True))
    assert [(c.window, c.fault) for c in cells] == [("pull-start", "stall"), ("mid-transfer", "corrupt")]
    assert all(c.ok for c in cells), format_matrix(cells)
    assert all(o == "exact" for c in cells for o in c.outcomes)  # the failed pulls were recomputed
    assert cells[0].seconds >= 1.0  # the stall was waited out to the transfer timeout, not skipped


def test_cli_writes_the_matrix(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "chaos.json"
    rc = main(["chaos", "--model", str(tiny_llama_dir), "--transport", "loopback", "--timeout-s", "1",
               "--lease-s", "2", "--reduced", "--only", "kv", "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["cells"]) == 2 and all(c["ok"] for c in data["cells"])
    assert "2/2 cells pass" in capsys.readouterr().out


def test_fault_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="kind"):
        KVFault(kind="melt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_index"):
        KVFault(kind="drop", chunk_index=-1)


def test_short_soak_keeps_invariants_and_leaks_nothing(tiny_llama_dir: Path) -> None:
    """Mixed rounds (clean, client gone mid-decode, random faults), each with fresh transports and
    servers: nothing breaks, KV blocks back to 0, no growth in threads or fds (a gRPC server's
    handler pool once leaked a thread per handler for every server made)."""
    from pdserve.soak import run_soak

    rig = ChaosRig(str(tiny_llama_dir), "grpc", timeout_s=1.0, lease_s=2.0)
    report = run_soak(rig, minutes=0.2, seed=1)
    assert report.rounds >= 5 and report.num_disconnects and report.num_faults, report
    assert not report.failed, report.failed
    assert report.ok, (report.baseline, report.final)


def test_fault_points_are_off_without_a_handler_and_pause_at_the_armed_one() -> None:
    """Production: no handler, every site returns at once. Armed: the coordinator holds the nth caller
    of its site (and only it) until released, and says which requests it held."""
    import asyncio

    from pdserve import faultpoints
    from pdserve.chaos_hooks import FaultCoordinator

    faultpoints.reached("decode.step", ["r1"])  # no handler: nothing happens, nothing blocks

    async def run() -> None:
        coord = FaultCoordinator()
        with pytest.raises(ValueError, match="site"):
            coord.arm("decode.nowhere")
        coord.arm("decode.step", nth=2)
        await coord.reached("decode.pull", ["r1"])  # another site: passes
        await coord.reached("decode.step", ["r1"])  # the first caller: passes
        held = asyncio.ensure_future(coord.reached("decode.step", ["r1", "r2"]))
        assert await coord.wait_reached(5.0) == ("decode.step", ["r1", "r2"])
        await asyncio.sleep(0.05)
        assert not held.done()  # held while the fault is injected
        await coord.reached("decode.step", ["r3"])  # fires once per arming: later callers pass
        coord.release()
        await asyncio.wait_for(held, 5.0)
        coord.arm("router.queued")
        assert await coord.wait_reached(0.05) is None  # nobody reached it

    asyncio.run(run())


@pytest.mark.ray
@pytest.mark.slow
def test_reduced_lifecycle_matrix_on_a_ray_deployment(tmp_path: Path) -> None:
    """One fault per window of a request's life (every fault used) on a real local Ray deployment
    with the real model, in a fresh process (its Ray job installs the fault-point handler): every
    cell keeps the invariants; a killed worker restarts and the request still ends exactly."""
    import os
    import subprocess
    import sys

    from pdserve import faultpoints

    out = tmp_path / "life.json"
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "chaos", "--only", "lifecycle", "--reduced",
                           "--json", str(out)], capture_output=True, text=True, timeout=480, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    assert sorted(c["window"] for c in cells) == sorted(faultpoints.SITES)  # every window, once
    assert {c["fault"] for c in cells} == {"kill-prefill", "kill-decode", "kill-router", "disconnect"}
    assert all(c["ok"] for c in cells), proc.stdout
    for c in cells:
        (outcome,) = c["outcomes"]
        if c["fault"] in ("kill-prefill", "kill-decode"):
            assert outcome == "exact", c  # one instance per pool: the request waits for the restart
            assert c["recovered_s"] > 0, c
        elif c["fault"] == "disconnect":
            assert outcome == "disconnected", c
        else:
            assert outcome == "exact" or outcome.startswith("error"), c
