"""A conversation's next turn through PrefillWorker → KV transfer → DecodeWorker with prefix caching:
the same tokens as without it, prefill computes only the new suffix, and the pull moves only the
KV decode does not hold (a delta pull)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.kvtransfer.factories import make_receiver, make_sender
from pdserve.prefill.worker import PrefillWorker
from pdserve.types import GenerateRequest, LatencyBreakdown, RequestId, SamplingParams
from tests.net import LOCAL

GREEDY = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
TURN1 = [5 + (i * 7) % 120 for i in range(37)]
NEW_MESSAGE = [11, 12, 13, 14, 15]


class _Pair:
    """One prefill and one decode worker, kept across turns."""

    def __init__(self, path: Path, caching: bool, transport: str) -> None:
        cfg = EngineConfig(device="cpu", block_size=8, kv_cache_memory_gb=0.01, max_model_len=256,
                           enable_prefix_caching=caching)
        pe, de = Engine.from_config(str(path), cfg), Engine.from_config(str(path), cfg)
        kv = KVTransferConfig(transport=transport, codec="raw", timeout_s=5)
        self.sender, self.receiver = make_sender(kv, pe.pool, pe.allocator, listen=LOCAL), \
            make_receiver(kv, de.pool, listen=LOCAL)
        self.prefill = PrefillWorker(pe, 64, 16, self.sender)
        self.decode = DecodeWorker(de, DecodeOptions("decode", 64, 2048), receiver=self.receiver)
        self.n = 0

    def turn(self, prompt: list[int]) -> tuple[list[int], LatencyBreakdown]:
        rid = RequestId(f"t{self.n}")
        self.n += 1
        self.prefill.submit(GenerateRequest(rid, tuple(prompt), GREEDY))
        results = []
        while self.prefill.has_work():
            results.extend(self.prefill.step())
        (res,) = results
        tokens, latency = list(res.first.token_ids), res.first.latency or LatencyBreakdown()
        self.decode.submit(GenerateRequest(rid, tuple(prompt), GREEDY, output_token_ids=res.first.token_ids), res.handle)
        deadline = time.monotonic() + 30
        while self.decode.has_work():
            assert time.monotonic() < deadline, "decode never finished"
            for o in self.decode.step():
                tokens.extend(o.token_ids)
                latency = latency + o.latency if o.latency is not None else latency
            time.sleep(0.001)
        while self.prefill.engine.allocator.num_used and time.monotonic() < deadline:
            self.prefill.step()  # serves the release the receiver sent
            time.sleep(0.01)
        for w in (self.prefill, self.decode):
            w.engine.allocator.check_integrity()
            assert w.engine.allocator.num_used == 0, f"{w.worker_id} leaked blocks"
        return tokens, latency

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()


@pytest.mark.parametrize("transport", ["grpc", "torch"])
def test_next_turn_reuses_kv_on_both_sides(tiny_llama_dir: Path, transport: str) -> None:
    plain, cached = _Pair(tiny_llama_dir, False, transport), _Pair(tiny_llama_dir, True, transport)
    try:
        answer, _ = plain.turn(TURN1)
        got1, first = cached.turn(TURN1)
        turn2 = TURN1 + answer + NEW_MESSAGE
        want, full = plain.turn(turn2)
        got, reused = cached.turn(turn2)
    finally:
        plain.close()
        cached.close()
    assert got1 == answer and got == want
    # turn 1 left 37 prompt + 8 decoded tokens' KV on decode (45 -> 5 full blocks of 8) and its 37-token
    # prompt on prefill (4 full blocks); turn 2 has 37 + 9 + 5 = 51 tokens.
    assert reused.cached_tokens == 32 and full.cached_tokens == 0
    assert reused.pull_skipped_tokens == 40 and full.pull_skipped_tokens == 0
    assert 0 < reused.transfer_bytes < 0.4 * full.transfer_bytes  # 11 of 51 tokens travel
    assert first.cached_tokens == 0 and first.pull_skipped_tokens == 0
