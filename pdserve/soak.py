"""`pdserve chaos --soak MINUTES`: the chaos rig under mixed load for a while, then the invariants
plus resource accounting.

Mixed load, in-process (one process holds the prefill and the decode worker): clean requests,
requests whose client goes away mid-decode (aborted on both sides, as the router does on a
disconnect), and, one round in four, a random fault of the matrix. Every round is checked as a
chaos cell; at the end: KV blocks in use back to zero, and against the values after warm-up (the
first fifth of the time), resident memory within 5%, no growth in open file descriptors or threads.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field

from pdserve.chaos import WINDOWS, Cell, ChaosRig
from pdserve.kvtransfer.faults import FAULT_KINDS
from pdserve.types import GenerateRequest, RequestId


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def _num_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class SoakReport:
    minutes: float
    rounds: int = 0
    failed: list[str] = field(default_factory=list)  # rounds that broke an invariant, with why
    num_faults: int = 0
    num_disconnects: int = 0
    baseline: dict[str, float] = field(default_factory=dict)  # after warm-up
    final: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        b, f = self.baseline, self.final
        return (not self.failed and f.get("blocks_in_use", 1) == 0 and f["rss_mib"] <= b["rss_mib"] * 1.05
                and f["fds"] <= b["fds"] and f["threads"] <= b["threads"])


def _sample(rig: ChaosRig) -> dict[str, float]:
    used = rig.prefill_engine.allocator.num_used + rig.decode_engine.allocator.num_used
    return {"rss_mib": round(_rss_mib(), 1), "fds": _num_fds(), "threads": threading.active_count(),
            "blocks_in_use": used}


def run_soak(rig: ChaosRig, minutes: float, seed: int = 0) -> SoakReport:
    rng, report = random.Random(seed), SoakReport(minutes)
    start = time.monotonic()
    end, warm = start + minutes * 60, start + minutes * 12  # warm-up: the first fifth
    while time.monotonic() < end:
        kind = rng.choice(["clean", "clean", "disconnect", "fault"])
        if kind == "fault":
            cell = rig.run_cell(rng.choice(list(WINDOWS)), rng.choice(FAULT_KINDS))
            report.num_faults += 1
        elif kind == "disconnect":
            cell = _disconnect_round(rig, rng)
            report.num_disconnects += 1
        else:
            cell = rig.run_cell("pull-start", "delay") if rng.random() < 0.5 else rig.run_cell("mid-transfer", "delay")
        report.rounds += 1
        if not cell.ok:
            report.failed.append(f"round {report.rounds} ({kind} {cell.window}/{cell.fault}): {cell.reason}")
        if not report.baseline and time.monotonic() >= warm:
            report.baseline = _sample(rig)
    report.baseline = report.baseline or _sample(rig)
    report.final = _settled(rig, report.baseline)
    return report


def _settled(rig: ChaosRig, baseline: dict[str, float], wait_s: float = 5.0) -> dict[str, float]:
    """The final sample, once threads and fds are back to the baseline or `wait_s` has passed: a
    thread still winding down from the last round's close() is not a leak; one that stays is."""
    deadline = time.monotonic() + wait_s
    while True:
        final = _sample(rig)
        if (final["threads"] <= baseline["threads"] and final["fds"] <= baseline["fds"]) \
                or time.monotonic() > deadline:
            return final
        time.sleep(0.1)


def _disconnect_round(rig: ChaosRig, rng: random.Random) -> Cell:
    """A request whose client leaves after a few decode tokens: aborted on decode and released on
    prefill; every block on both sides must come back."""
    from pdserve.decode.scheduler import DecodeOptions
    from pdserve.decode.worker import DecodeWorker
    from pdserve.kvtransfer.factories import make_receiver, make_sender
    from pdserve.prefill.worker import PrefillWorker

    cell = Cell("mid-decode", "disconnect")
    pe, de = rig.prefill_engine, rig.decode_engine
    sender = make_sender(rig.kv, pe.pool, pe.allocator, listen=rig.listen)
    receiver = make_receiver(rig.kv, de.pool, listen=rig.listen)
    prefill = PrefillWorker(pe, 8, 1024, sender)
    decode = DecodeWorker(de, DecodeOptions("decode", 8, 1024), receiver=receiver)
    try:
        rid, prompt = RequestId("soak"), rig.encode(rng.choice(["Tell me a story", "List three colours"]))
        prefill.submit(GenerateRequest(rid, prompt, rig.params))
        (res,) = prefill.step()
        decode.submit(GenerateRequest(rid, prompt, rig.params, output_token_ids=res.first.token_ids), res.handle)
        for _ in range(rng.randint(0, 6)):
            decode.step()
        decode.abort(rid)
        prefill.abort(rid)
        rig.await_blocks_free(cell, prefill, decode)
    finally:
        receiver.close()
        sender.close()
    cell.ok = not cell.reason
    return cell
