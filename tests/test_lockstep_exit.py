"""Lock-step ranks exit cleanly and in bounded time (pdserve/runtime/lockstep.py `LockStep.leave`):
at exit a rank tells the others to stop, so no follower is left blocked in the step collective waiting for a
rank 0 that will not step again (it then died in gloo, or held its process through finalization).
Each rank is a fresh interpreter (tests/lockstep_exit_rank.py) that exits normally."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ranks(linger_s: tuple[float, float]) -> list[tuple[int, str, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.lockstep_exit_rank", str(r), init, str(linger_s[r])],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=120)
        out.append((p.returncode, text, time.monotonic() - start))
    return out


def test_rank0_exiting_first_stops_its_followers_cleanly() -> None:
    (rc0, out0, _), (rc1, out1, t1) = _ranks(linger_s=(0.5, 6.0))
    assert rc0 == 0, out0
    assert rc1 == 0, out1  # it was told to stop: no "step loop died", no thread left in gloo
    assert "step loop died" not in out0 + out1, out0 + out1
    assert t1 < 60, t1


def test_both_ranks_exiting_together_exit_cleanly() -> None:
    """A race (either may leave first): 3 tries. Before, a try aborted now and then ("terminate called
    without an active exception", -6: gloo's threads torn down in finalization) or died in gloo."""
    for _ in range(3):
        (rc0, out0, _), (rc1, out1, _) = _ranks(linger_s=(1.0, 1.0))
        assert (rc0, rc1) == (0, 0) or ("a rank of this instance left it" in out0 and rc1 == 0), out0 + out1
        assert "Connection closed by peer" not in out0 + out1, out0 + out1


def test_a_follower_exiting_first_fails_rank0_by_design() -> None:
    """Crash-only: an instance that lost a rank cannot step; rank 0's actor exits (the router fails its
    requests over) with a message that says why, not a gloo error."""
    (rc0, out0, _), (rc1, out1, _) = _ranks(linger_s=(6.0, 0.5))
    assert rc1 == 0, out1
    assert rc0 == 1 and "a rank of this instance left it" in out0, out0
