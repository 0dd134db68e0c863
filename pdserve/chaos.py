"""`pdserve chaos`: inject faults at the KV-transfer windows of a disaggregated request's life and
check the invariants in every cell (fault × window).

In-process, no Ray: a prefill worker and a decode worker of the real engine, joined by the
configured transport wrapped in `FaultyTransport` (explicit injection, kvtransfer/faults.py).
Windows: `pull-start` (decode waiting for its pull: the first chunk) and `mid-transfer` (a chunk in
the middle). Faults: drop / corrupt / delay / truncate a KV chunk, a transport that stalls.
Invariants per cell: every request ends with exactly the colocated greedy tokens and text, or with
an explicit error (never silently different); none runs past the transfer timeout plus a margin;
every KV block on both sides is free again within the lease; the fault really hit.
The other windows of a request's life, with kills of either worker or the router and client
disconnects, need a Ray deployment: pdserve/chaos_lifecycle.py.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.kvtransfer.factories import make_receiver, make_sender, make_transport
from pdserve.kvtransfer.faults import FAULT_KINDS, FaultyTransport, KVFault
from pdserve.kvtransfer.listen import Listen
from pdserve.prefill.worker import PrefillWorker
from pdserve.types import GenerateRequest, RequestId, SamplingParams

WINDOWS = {"pull-start": 0, "mid-transfer": 3}  # window -> index of the chunk the fault hits
PROMPTS = ("The capital of France is", "def fibonacci(n):")


@dataclass
class Cell:
    window: str
    fault: str
    ok: bool = False
    reason: str = ""
    seconds: float = 0.0  # the slowest request of the cell, submit to last token
    blocks_free_s: float = 0.0  # after the last token, until both sides hold no KV block (or their baseline)
    recovered_s: float = 0.0  # lifecycle cells: from the fault until the deployment is whole and exact again
    outcomes: list[str] = field(default_factory=list)  # per request: "exact" | "error: ..." | "WRONG"


class ChaosRig:
    """A colocated reference and a prefill→decode pair that is rebuilt per cell (a fresh transport)."""

    def __init__(self, model: str, transport: str = "grpc", timeout_s: float = 3.0, lease_s: float = 5.0) -> None:
        self.cfg = EngineConfig(block_size=16, kv_cache_memory_gb=0.05, max_model_len=512)
        self.kv = KVTransferConfig(transport=transport, codec="raw", timeout_s=timeout_s, lease_s=lease_s)
        self.model = model
        self.listen = Listen.resolve(self.kv, socket.gethostbyname("localhost"))  # in-process: both ends here
        self.prefill_engine, self.decode_engine = (Engine.from_config(model, self.cfg) for _ in range(2))
        self.tokenizer = self.prefill_engine.tokenizer
        self.params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        self.reference = {p: self._colocated(p) for p in PROMPTS}

    def encode(self, prompt: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(prompt)) if self.tokenizer else tuple(b % 100 + 3 for b in prompt.encode())

    def _colocated(self, prompt: str) -> tuple[list[int], str]:
        worker = DecodeWorker(self.decode_engine, DecodeOptions("prefill_priority", 8, 1024))
        worker.submit(GenerateRequest(RequestId("ref"), self.encode(prompt), self.params))
        ids, text = [], ""
        while worker.has_work():
            for o in worker.step():
                ids += o.token_ids
                text += o.text
        return ids, text

    def run_cell(self, window: str, fault: str) -> Cell:
        cell = Cell(window, fault)
        pe, de = self.prefill_engine, self.decode_engine
        fault_spec = KVFault(kind=fault, chunk_index=WINDOWS[window], stall_s=self.kv.timeout_s * 4)
        faulty = FaultyTransport(make_transport(self.kv.transport, self.listen), fault_spec)
        sender = make_sender(self.kv, pe.pool, pe.allocator, listen=self.listen, transport=faulty)
        receiver = make_receiver(self.kv, de.pool, listen=self.listen)
        prefill = PrefillWorker(pe, 8, 1024, sender)
        decode = DecodeWorker(de, DecodeOptions("decode", 8, 1024), receiver=receiver)
        try:
            self._drive(cell, prefill, decode)
            if not cell.reason and not faulty.num_faults:
                cell.reason = "the fault never hit (too few chunks?)"
        finally:
            receiver.close()
            sender.close()
        cell.ok = not cell.reason
        return cell

    def _drive(self, cell: Cell, prefill: PrefillWorker, decode: DecodeWorker) -> None:
        start = time.monotonic()
        firsts: dict[str, list[int]] = {}
        texts: dict[str, str] = {}
        for i, p in enumerate(PROMPTS):
            rid = RequestId(f"chaos-{i}")
            prefill.submit(GenerateRequest(rid, self.encode(p), self.params))
        results = []
        while prefill.has_work():
            results += prefill.step()
        for res in results:
            rid = res.first.request_id
            firsts[rid], texts[rid] = list(res.first.token_ids), res.first.text
            prompt = PROMPTS[int(rid.split("-")[1])]
            decode.submit(GenerateRequest(rid, self.encode(prompt), self.params,
                                          output_token_ids=res.first.token_ids), res.handle)
        errors: dict[str, str] = {}
        bound = self.kv.timeout_s + 30.0
        while decode.has_work():
            if time.monotonic() - start > bound:
                cell.reason = f"hang: a request ran past {bound:.0f} s"
                return
            for o in decode.step():
                firsts[o.request_id] += o.token_ids
                texts[o.request_id] += o.text
                if o.error:
                    errors[o.request_id] = o.error
            prefill.step()  # serves releases and leases, as its step loop would
        cell.seconds = round(time.monotonic() - start, 3)
        for rid in sorted(firsts):
            want = self.reference[PROMPTS[int(rid.split("-")[1])]]
            if rid in errors:
                cell.outcomes.append(f"error: {errors[rid]}")
            elif (firsts[rid], texts[rid]) == want:
                cell.outcomes.append("exact")
            else:
                cell.outcomes.append("WRONG")
                cell.reason = f"{rid}: output differs from the colocated greedy output"
        self.await_blocks_free(cell, prefill, decode)

    def await_blocks_free(self, cell: Cell, prefill: PrefillWorker, decode: DecodeWorker) -> None:
        done = time.monotonic()
        while prefill.engine.allocator.num_used or decode.engine.allocator.num_used:
            if time.monotonic() - done > self.kv.lease_s + 5.0:
                cell.reason = cell.reason or (f"KV leaked: prefill holds {prefill.engine.allocator.num_used}, "
                                              f"decode {decode.engine.allocator.num_used} blocks past the lease")
                return
            prefill.step()
            time.sleep(0.01)
        cell.blocks_free_s = round(time.monotonic() - done, 3)


def run_matrix(rig: ChaosRig, cells: list[tuple[str, str]]) -> list[Cell]:
    return [rig.run_cell(w, f) for w, f in cells]


def format_matrix(cells: list[Cell]) -> str:
    rows = [f"{'window':<18}{'fault':<14}{'result':<7}{'s':>7}{'free s':>8}{'whole s':>9}  detail"]
    for c in cells:
        detail = c.reason or ", ".join(sorted(set(o.split(":")[0] for o in c.outcomes)))
        rows.append(f"{c.window:<18}{c.fault:<14}{'pass' if c.ok else 'FAIL':<7}{c.seconds:>7.2f}"
                    f"{c.blocks_free_s:>8.2f}{c.recovered_s:>9.2f}  {detail}")
    return "\n".join(rows)


def cells_of(reduced: bool) -> list[tuple[str, str]]:
    if reduced:
        return [("pull-start", "stall"), ("mid-transfer", "corrupt")]
    return [(w, f) for w in WINDOWS for f in FAULT_KINDS]
