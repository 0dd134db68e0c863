"""The engine against `transformers` on the same weights: logits within tolerance, greedy tokens equal."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.batch import Batch, Chunk
from pdserve.engine.engine import Engine
from pdserve.engine.request import RequestStatus, append_token
from pdserve.types import GenerateRequest, RequestId, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = [[1, 5, 9, 22, 7], [3, 4], list(range(10, 47)), [100] * 19]


def _engine(path, block_size: int = 4) -> Engine:
    cfg = EngineConfig(device="cpu", block_size=block_size, kv_cache_memory_gb=0.002, max_model_len=512)
    return Engine.from_config(str(path), cfg)


def _generate(engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY,
              policy: str = "prefill_priority", budget: int = 2048, stats: dict | None = None) -> list[list[int]]:
    options = DecodeOptions(policy, max_num_seqs=64, max_num_batched_tokens=budget)  # type: ignore[arg-type]
    worker = DecodeWorker(engine, options)
    out = worker.run_to_completion([GenerateRequest(RequestId(f"r{i}"), tuple(p), params)
                                    for i, p in enumerate(prompts)])
    engine.allocator.check_integrity()
    assert engine.allocator.num_used == 0, "blocks leaked"
    if stats is not None:
        stats["preemptions"] = worker.scheduler.num_preemptions
    return out


def _hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_match_transformers(tiny_hf) -> None:
    path, hf = tiny_hf
    ours = _generate(_engine(path), PROMPTS)
    for prompt, toks in zip(PROMPTS, ours):
        assert toks == _hf_greedy(hf, prompt, 16)


def test_prefill_logits_match_transformers(tiny_hf) -> None:
    path, hf = tiny_hf
    engine = _engine(path)
    prompt = PROMPTS[2]
    req = engine.add_request(GenerateRequest(RequestId("x"), tuple(prompt), GREEDY))
    req.status = RequestStatus.RUNNING
    assert engine.ensure_blocks(req, len(prompt))
    ours = engine.runner.execute([Chunk(req, len(prompt))], all_positions=True)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy,budget", [("prefill_priority", 2048), ("chunked", 8), ("chunked", 3)])
def test_batched_equals_one_at_a_time(tiny_llama, policy: str, budget: int) -> None:
    path, _ = tiny_llama
    engine = _engine(path)
    alone = [_generate(engine, [p])[0] for p in PROMPTS]
    assert _generate(engine, PROMPTS, policy=policy, budget=budget) == alone


def test_preemption_by_recompute_keeps_tokens(tiny_llama) -> None:
    """A cache too small for every request at once forces preemptions; tokens must not change."""
    path, _ = tiny_llama
    big = _engine(path)
    block_bytes = big.layout.bytes_per_block
    small = Engine.from_config(str(path), EngineConfig(device="cpu", block_size=4,
                                                       kv_cache_memory_gb=24 * block_bytes / 1e9,
                                                       max_model_len=512))
    assert small.allocator.num_blocks == 24  # fewer than the four requests need together
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    stats: dict = {}
    assert _generate(small, PROMPTS, params, stats=stats) == _generate(big, PROMPTS, params)
    assert stats["preemptions"] > 0


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama) -> None:
    path, _ = tiny_llama
    engine = _engine(path)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    together = _generate(engine, PROMPTS, params)
    assert together == _generate(engine, PROMPTS, params)
    assert [_generate(engine, [p], params)[0] for p in PROMPTS] == together
    unseeded = SamplingParams(temperature=0.9, max_tokens=12, ignore_eos=True)
    assert _generate(engine, PROMPTS[:1], params.replace(seed=99)) != together[:1] or \
        _generate(engine, PROMPTS[:1], unseeded) != together[:1]


def test_max_tokens_and_stop_token_ids(tiny_llama) -> None:
    path, hf = tiny_llama
    engine = _engine(path)
    ref = _hf_greedy(hf, PROMPTS[0], 16)
    assert _generate(engine, [PROMPTS[0]], GREEDY.replace(max_tokens=3)) == [ref[:3]]
    stop_at = ref[5]
    cut = ref.index(stop_at) + 1
    assert _generate(engine, [PROMPTS[0]], GREEDY.replace(stop_token_ids=(stop_at,))) == [ref[:cut]]


def test_bad_requests_raise_naming_the_field(tiny_llama) -> None:
    path, _ = tiny_llama
    engine = _engine(path)
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(GenerateRequest(RequestId("a"), tuple([1] * 600), GREEDY))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(GenerateRequest(RequestId("b"), (1, 999), GREEDY))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(GenerateRequest(RequestId("c"), (), GREEDY))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_mixed_batch_of_prefill_chunk_and_decodes(tiny_llama) -> None:
    """One step that prefills a chunk of one request while others decode gives the same tokens."""
    path, _ = tiny_llama
    engine = _engine(path)
    alone = [_generate(engine, [p])[0] for p in PROMPTS]
    reqs = [engine.add_request(GenerateRequest(RequestId(f"m{i}"), tuple(p), GREEDY)) for i, p in enumerate(PROMPTS)]
    rng = random.Random(0)
    for r in reqs:
        r.status = RequestStatus.RUNNING
    while any(not r.finished for r in reqs):
        chunks = []
        for r in reqs:
            if r.finished:
                continue
            n = min(r.num_uncomputed_tokens, rng.randint(1, 7))
            assert engine.ensure_blocks(r, r.num_computed_tokens + n)
            chunks.append(Chunk(r, n))
        for r, token in engine.step(Batch(tuple(chunks))):  # the engine samples; the caller appends and stops
            append_token(r, token, engine.eos_token_ids, engine.max_model_len)
            if r.finished:
                engine.free(r)
    assert [r.output_token_ids for r in reqs] == alone
    assert engine.allocator.num_used == 0
