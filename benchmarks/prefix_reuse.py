"""Prefix reuse across the turns of real conversations, disaggregated, with and without prefix caching.

One prefill and one decode worker (in-process, SmolLM2-135M, grpc KV transfer on loopback) serve
ShareGPT sessions turn by turn: turn k's prompt is turn k-1's prompt, its greedy answer and the next
user message (token ids; no chat template). The same sessions run on a pair with
`engine.enable_prefix_caching` and on a pair without, alternating turn by turn so both see the same
machine load. Per turn index it reports the prompt tokens, the tokens prefill computed, the KV bytes
pulled, the prefill time and the transfer time, and checks that both pairs give the same tokens.

Usage: python benchmarks/prefix_reuse.py [--sessions 6] [--turns 4] [--max-output 48]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from pdserve.bench.sessions import SessionSpec, build_sessions
from pdserve.bench.tokenizer import load_tokenizer
from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.kvtransfer.factories import make_receiver, make_sender
from pdserve.kvtransfer.listen import Listen
from pdserve.prefill.worker import PrefillWorker
from pdserve.types import GenerateRequest, LatencyBreakdown, RequestId, SamplingParams

MODEL = "smollm2-135m"


class Pair:
    def __init__(self, caching: bool) -> None:
        cfg = EngineConfig(device="cpu", num_threads=1, kv_cache_memory_gb=0.5, enable_prefix_caching=caching)
        pe, de = Engine.from_config(MODEL, cfg), Engine.from_config(MODEL, cfg)
        kv, local = KVTransferConfig(transport="grpc", codec="raw"), Listen.on("127.0.0.1")
        self.sender, self.receiver = make_sender(kv, pe.pool, pe.allocator, listen=local), \
            make_receiver(kv, de.pool, listen=local)
        self.prefill = PrefillWorker(pe, 64, 2048, self.sender)
        self.decode = DecodeWorker(de, DecodeOptions("decode", 64, 2048), receiver=self.receiver)
        self.n = 0

    def turn(self, prompt: list[int], max_tokens: int) -> tuple[list[int], LatencyBreakdown]:
        rid, self.n = RequestId(f"t{self.n}"), self.n + 1
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.prefill.submit(GenerateRequest(rid, tuple(prompt), params))
        results = []
        while self.prefill.has_work():
            results.extend(self.prefill.step())
        (res,) = results
        tokens, latency = list(res.first.token_ids), res.first.latency or LatencyBreakdown()
        self.decode.submit(GenerateRequest(rid, tuple(prompt), params, output_token_ids=res.first.token_ids), res.handle)
        while self.decode.has_work():
            for o in self.decode.step():
                tokens.extend(o.token_ids)
                latency = latency + o.latency if o.latency is not None else latency
        deadline = time.monotonic() + 10
        while self.prefill.engine.allocator.num_used and time.monotonic() < deadline:
            self.prefill.step()
            time.sleep(0.005)
        return tokens, latency

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-output", type=int, default=48)
    args = ap.parse_args()
    tok = load_tokenizer(MODEL)
    spec = SessionSpec(num_sessions=args.sessions, max_turns=args.turns, max_context_len=1024, max_user_len=128,
                       max_output_len=args.max_output)
    sessions = build_sessions(spec, tok)
    pairs = {"no cache": Pair(False), "prefix cache": Pair(True)}
    rows: dict[tuple[str, int], list[tuple[int, int, float, float, float]]] = defaultdict(list)
    try:
        for s in sessions:
            history: dict[str, list[int]] = {name: [] for name in pairs}
            for k, t in enumerate(s.turns):
                outs = {}
                for name, pair in pairs.items():
                    prompt = history[name] + tok.encode(t.user)
                    out, lat = pair.turn(prompt, t.output_len)
                    history[name] = prompt + out
                    outs[name] = out
                    rows[(name, k)].append((len(prompt), len(prompt) - lat.cached_tokens, float(lat.transfer_bytes or 0),
                                            lat.prefill_s, lat.transfer_s))
                assert outs["no cache"] == outs["prefix cache"], "prefix caching changed the greedy tokens"
    finally:
        for pair in pairs.values():
            pair.close()
    print(f"{len(sessions)} ShareGPT sessions, SmolLM2-135M fp32 on CPU, greedy tokens identical with and without")
    print("| turn | system | prompt tok | prefill computed tok | KV pulled MB | prefill s | transfer s |")
    print("|---|---|---|---|---|---|---|")
    for k in range(args.turns):
        for name in pairs:
            r = rows.get((name, k))
            if r:
                med = [statistics.median(x) for x in zip(*r)]
                print(f"| {k + 1} | {name} | {med[0]:.0f} | {med[1]:.0f} | {med[2] / 1e6:.2f} | {med[3]:.3f} | {med[4]:.3f} |")


if __name__ == "__main__":
    main()
