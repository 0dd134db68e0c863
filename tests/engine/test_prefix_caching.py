"""Prefix caching in the engine: the same greedy tokens with and without it, and the hits really happen.

Oracle: an engine without the cache (and `transformers` for the multi-turn case). Covered: shared
prefixes across requests, a conversation's next turn (prompt + answer reused), prompts that end
inside or exactly at a block boundary, eviction under memory pressure, preemption, and the same
prompt twice in one batch.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.engine.prefix_cache import PrefixCachingAllocator
from pdserve.types import GenerateRequest, RequestId, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SYSTEM = list(range(3, 30))  # 27 tokens: six full blocks of 4 and a partial one


def _engine(path, caching: bool, num_blocks: int | None = None, block_size: int = 4) -> Engine:
    gb = 0.002 if num_blocks is None else num_blocks * 2 * 2 * 2 * 16 * 4 * block_size / 1e9  # tiny layout
    cfg = EngineConfig(device="cpu", block_size=block_size, kv_cache_memory_gb=gb, max_model_len=512,
                       enable_prefix_caching=caching)
    engine = Engine.from_config(str(path), cfg)
    assert num_blocks is None or engine.allocator.num_blocks == num_blocks
    return engine


class _Runner:
    """One decode worker (colocated) kept across rounds, so later rounds can hit earlier ones' blocks."""

    def __init__(self, engine: Engine, policy: str = "prefill_priority", budget: int = 2048) -> None:
        self.engine = engine
        self.worker = DecodeWorker(engine, DecodeOptions(policy, max_num_seqs=64, max_num_batched_tokens=budget))  # type: ignore[arg-type]
        self.n = 0
        self.cached_tokens: list[int] = []

    def round(self, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
        reqs = [GenerateRequest(RequestId(f"r{self.n + i}"), tuple(p), params) for i, p in enumerate(prompts)]
        self.n += len(prompts)
        seen = {}
        orig = self.engine.reuse_prefix

        def spy(req):  # record each request's reuse as the scheduler asks for it
            got = orig(req)
            seen[req.request_id] = max(seen.get(req.request_id, 0), req.num_prefix_hit_tokens)
            return got

        self.engine.reuse_prefix = spy  # type: ignore[method-assign]
        try:
            out = self.worker.run_to_completion(reqs)
        finally:
            del self.engine.reuse_prefix
        self.cached_tokens += [seen.get(r.request_id, 0) for r in reqs]
        self.engine.allocator.check_integrity()
        assert self.engine.allocator.num_used == 0, "blocks leaked"
        return out


def test_shared_prefixes_reuse_blocks_and_keep_tokens(tiny_llama) -> None:
    path, _ = tiny_llama
    prompts = [SYSTEM + [40 + i, 41, 42 + i] for i in range(4)] + [SYSTEM[:8], SYSTEM[:9], SYSTEM]
    plain = _Runner(_engine(path, caching=False))
    cached = _Runner(_engine(path, caching=True))
    for p in prompts:  # one at a time: each later prompt can find the earlier ones' blocks
        assert cached.round([p]) == plain.round([p])
    # The first prompt computes everything; the others reuse SYSTEM's six full blocks (24 tokens),
    # SYSTEM[:8] (two blocks, ends on a boundary) reuses one block so its last token is computed.
    assert cached.cached_tokens == [0, 24, 24, 24, 4, 8, 24]
    alloc = cached.engine.allocator
    assert isinstance(alloc, PrefixCachingAllocator) and alloc.num_hit_blocks == sum(cached.cached_tokens) // 4


def test_next_turn_reuses_prompt_and_answer_and_matches_transformers(tiny_hf) -> None:
    path, hf = tiny_hf
    runner = _Runner(_engine(path, caching=True))
    turn1 = SYSTEM + [50, 51]
    answer = runner.round([turn1])[0]
    turn2 = turn1 + answer + [60, 61, 62]
    second = runner.round([turn2])[0]
    # turn1 (29) + 10 answer tokens: the last answer token was never fed, so 38 tokens have KV:
    # nine full blocks (36 tokens) are reused.
    assert runner.cached_tokens == [0, 36]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([turn2]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(turn2):].tolist()
    assert second == ref


def test_eviction_under_memory_pressure_keeps_tokens(tiny_llama) -> None:
    path, _ = tiny_llama
    prompts = [[7 + i] * 13 + list(range(20, 30)) for i in range(6)]
    plain = _Runner(_engine(path, caching=False))
    small = _Runner(_engine(path, caching=True, num_blocks=16))
    for p in prompts + prompts[:2]:
        assert small.round([p]) == plain.round([p])
    alloc = small.engine.allocator
    assert isinstance(alloc, PrefixCachingAllocator) and alloc.num_evicted_blocks > 0
    assert small.cached_tokens[-2:] == [0, 0]  # the two oldest prompts were evicted before they came back


def test_preemption_and_duplicates_in_one_batch_keep_tokens(tiny_llama) -> None:
    path, _ = tiny_llama
    prompts = [SYSTEM + [40], SYSTEM + [40], SYSTEM + [41, 42], list(range(60, 90))]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    want = _Runner(_engine(path, caching=False)).round(prompts, params)
    small = _Runner(_engine(path, caching=True, num_blocks=24), policy="chunked", budget=8)
    small.round([SYSTEM + [39]], params)  # warm the cache with the shared prefix
    assert small.round(prompts, params) == want
    assert small.worker.scheduler.num_preemptions > 0
    assert min(small.cached_tokens[1:4]) > 0


@pytest.mark.parametrize("caching", [False, True])
def test_reuse_is_off_without_the_flag_and_idempotent(tiny_llama, caching: bool) -> None:
    path, _ = tiny_llama
    engine = _engine(path, caching=caching)
    runner = _Runner(engine)
    runner.round([SYSTEM])
    req = engine.add_request(GenerateRequest(RequestId("x"), tuple(SYSTEM), GREEDY))
    got = engine.reuse_prefix(req)
    assert got == (24 if caching else 0) and engine.reuse_prefix(req) == 0  # a second call reuses nothing
    engine.free(req)
    engine.allocator.check_integrity()


def test_worker_stats_count_prefix_cache_tokens(tiny_llama) -> None:
    path, _ = tiny_llama
    runner = _Runner(_engine(path, caching=True))
    runner.round([SYSTEM + [40]])
    runner.round([SYSTEM + [41]])
    stats = runner.worker.stats()
    assert stats.prefix_cache_hit_tokens == 24  # the second prompt found SYSTEM's six blocks
    assert stats.prefix_cache_queried_tokens == 6 * 4 + 6 * 4  # each lookup asked for its six full blocks
    assert stats.num_steps > 0 and stats.num_fallback_steps == 0
