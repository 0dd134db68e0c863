"""Processes that use the transports exit cleanly, closed or not: no thread is left inside gloo, the
c10d store or a forward pass when the interpreter finalizes (one that returns then aborts the
process: "terminate called without an active exception", exit status 134).

Each case runs in a fresh interpreter that leaves work in flight and exits without closing anything.
A guard registered before pdserve is imported runs last at exit and fails the process if one of
pdserve's native-blocking threads is still alive; a slow finalizer (`__del__` that sleeps) holds the
interpreter in finalization long enough for a stray thread's native wait to time out and abort it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_PRELUDE = """
import atexit, os, sys, threading, time
NATIVE = ("torch-send-", "torch-recv-", "torch-deliver-", "grpc-recv-", "pdserve-step")

@atexit.register  # registered first, so it runs after pdserve's own exit hooks
def _guard():
    left = [t.name for t in threading.enumerate() if t.name.startswith(NATIVE) and t.is_alive()]
    if left:
        print("threads left at exit:", left, file=sys.stderr, flush=True)
        os._exit(3)

class _SlowFinalizer:
    def __del__(self):
        time.sleep(1.5)

_slow = _SlowFinalizer()
from tests.net import LOCAL  # after the guard: it imports pdserve
"""

_TWO_ENDS = """
from pdserve.kvtransfer.factories import make_transport
from pdserve.kvtransfer.types import TransferId
release = threading.Event()

def blocking_source():
    # like KVSender._frames: waits for a layer that is never written, until its send ends
    yield b"x" * 1024
    release.wait()
    yield b"y"

rx, tx = make_transport(NAME, LOCAL, pair_timeout_s=1.5).start(), make_transport(NAME, LOCAL, pair_timeout_s=1.5).start()
info = rx.connect_info(tx.endpoint())
"""

_IN_FLIGHT = """
    got = []
    state = rx.recv(TransferId("x"), tx.endpoint(), got.append, 30)
    tx.send(TransferId("x"), blocking_source(), info, 30).on_end(release.set)
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got, state
"""

CASES = {
    "torch_pair_never_joined": ("", """
        from pdserve.kvtransfer.transport_torch import TorchTransport
        t = TorchTransport(LOCAL, pair_timeout_s=1.0).start()
        t.connect_info("a-sender-that-never-comes")
    """),
    "torch_transfer_in_flight": ("NAME = 'torch'\n" + _TWO_ENDS, _IN_FLIGHT),
    "torch_send_nobody_expects": ("NAME = 'torch'\n" + _TWO_ENDS, """
        s = tx.send(TransferId("late"), iter([b"z" * 4096] * 8), info, 30)
        time.sleep(0.5)
        assert not s.status().terminal, s  # blocked in gloo: the receiver posts no receive
    """),
    "grpc_transfer_in_flight": ("NAME = 'grpc'\n" + _TWO_ENDS, _IN_FLIGHT),
}

_DEPLOYMENT = """
import torch
from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.kvtransfer.factories import make_receiver, make_sender
from pdserve.prefill.worker import PrefillWorker
from pdserve.runtime.step_loop import StepLoop
from pdserve.types import GenerateRequest, RequestId, SamplingParams

torch.set_num_threads(1)
cfg = EngineConfig(device="cpu", block_size=8, kv_cache_memory_gb=0.01, max_model_len=256)
pe, de = Engine.from_config(MODEL, cfg), Engine.from_config(MODEL, cfg)
kv = KVTransferConfig(transport=NAME, codec="raw", timeout_s=5)
prefill = PrefillWorker(pe, 8, 256, make_sender(kv, pe.pool, pe.allocator, listen=LOCAL))
decode = DecodeWorker(de, DecodeOptions("decode", 8, 256), receiver=make_receiver(kv, de.pool, listen=LOCAL))
params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
outputs = []
for i in range(3):
    req = GenerateRequest(RequestId(f"r{i}"), tuple(range(3, 40)), params)
    prefill.submit(req)
    (res,) = prefill.step()
    decode.submit(GenerateRequest(req.request_id, req.prompt_token_ids, params,
                                  output_token_ids=res.first.token_ids), res.handle)
loops = [StepLoop(w.step, w.has_work, outputs.extend) for w in (prefill, decode)]
for loop in loops:
    loop.start()
deadline = time.monotonic() + 30
while len(outputs) < 10 and time.monotonic() < deadline:
    time.sleep(0.01)
assert len(outputs) >= 10, "decode did not run"
"""


def _run(script: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=env, cwd=Path(__file__).parents[2])


def _assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_transport_left_open_exits_cleanly(case: str) -> None:
    setup, body = CASES[case]
    _assert_clean(_run(_PRELUDE + setup + textwrap.dedent(body)))


@pytest.mark.parametrize("name", ["torch", "grpc"])
def test_transport_closed_exits_cleanly(name: str) -> None:
    script = f"NAME = {name!r}\n" + _TWO_ENDS + textwrap.dedent("""
        got = []
        rx.recv(TransferId("x"), tx.endpoint(), got.append, 30)
        tx.send(TransferId("x"), blocking_source(), info, 30).on_end(release.set)
        time.sleep(0.5)
        t0 = time.monotonic()
        rx.close(); tx.close(); rx.close(); tx.close()
        assert time.monotonic() - t0 < 15, "close() waited on a thread stuck in native code"
    """)
    _assert_clean(_run(_PRELUDE + script))


@pytest.mark.parametrize("name", ["torch", "grpc"])
def test_in_process_deployment_left_running_exits_cleanly(tiny_llama_dir: Path, name: str) -> None:
    """Prefill and decode workers with step loops mid-generation and KV pulls done over `name`."""
    script = f"NAME, MODEL = {name!r}, {str(tiny_llama_dir)!r}\n" + _DEPLOYMENT
    _assert_clean(_run(_PRELUDE + script))
