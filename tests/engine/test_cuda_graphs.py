"""Decode steps at padded, fixed shapes (engine/cuda_graphs.py): the padding and packing logic and
the fixed-shape step run eagerly on CPU against the ordinary step; the capture itself on CUDA."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.attention import StaticDecode, build_metadata, paged_attention, static_decode_attention
from pdserve.engine.batch import Chunk
from pdserve.engine.cuda_graphs import (GRAPH_BATCH_SIZES, blocks_bucket, pack_inputs, padded_batch,
                                        unpack_inputs)
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, RequestStatus
from pdserve.types import GenerateRequest, RequestId, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
PROMPTS = [[1, 5, 9, 22, 7], [3, 4], list(range(10, 47)), [100] * 19, [7] * 33]


def test_padded_batch_and_blocks_bucket() -> None:
    assert [padded_batch(n) for n in (1, 2, 3, 5, 16, 17, 64)] == [1, 2, 4, 8, 16, 32, 64]
    assert padded_batch(65) is None and padded_batch(3, (2, 6)) == 6
    assert [blocks_bucket(n, 128) for n in (0, 1, 2, 3, 9, 128, 200)] == [1, 1, 2, 4, 16, 128, 128]
    assert blocks_bucket(100, 40) == 40


def test_pack_inputs_pads_with_the_scratch_block() -> None:
    reqs = []
    for i, (prompt, out, table) in enumerate([([5, 6, 7], [9], [3, 1]), ([8], [], [4])]):
        r = Request(RequestId(f"r{i}"), prompt, GREEDY, output_token_ids=out, block_table=table)
        r.num_computed_tokens = r.num_tokens - 1
        reqs.append(r)
    buf = torch.full((100,), -7, dtype=torch.long)
    size = pack_inputs([Chunk(r, 1) for r in reqs], B=4, NB=2, block_size=2, scratch_block=99, out=buf)
    ids, pos, slots, ctx, tables = unpack_inputs(buf, 4, 2)
    assert size == 4 * 4 + 4 * 2 and buf[size] == -7
    assert ids.tolist() == [9, 8, 0, 0] and pos.tolist() == [3, 0, 0, 0]
    assert slots.tolist() == [1 * 2 + 1, 4 * 2, 198, 198]  # position 3 → block 1 of [3, 1], offset 1
    assert ctx.tolist() == [4, 1, 1, 1]
    assert tables.tolist() == [[3, 1], [4, 99], [99, 99], [99, 99]]


@pytest.mark.parametrize("h_q, h_kv", [(4, 2), (9, 3), (4, 4)])
def test_static_decode_attention_matches_reference(h_q: int, h_kv: int) -> None:
    """Fixed shapes with padding rows and padded block tables against the reference decode."""
    torch.manual_seed(h_q)
    block, d, ctx = 4, 8, [5, 12, 1]
    num_blocks = 20
    k_cache, v_cache = torch.randn(num_blocks + 1, block, h_kv, d), torch.randn(num_blocks + 1, block, h_kv, d)
    ids = list(range(num_blocks))
    random.Random(0).shuffle(ids)
    tables = [[ids.pop() for _ in range(-(-c // block))] for c in ctx]
    q, k, v = torch.randn(3, h_q, d), torch.randn(3, h_kv, d), torch.randn(3, h_kv, d)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    want = paged_attention(q, k, v, ref_k, ref_v, build_metadata([1] * 3, ctx, tables, block, torch.device("cpu")))
    B, NB, scratch = 4, 4, num_blocks
    tab = torch.tensor([t + [scratch] * (NB - len(t)) for t in tables] + [[scratch] * NB])
    ctx_t = torch.tensor(ctx + [1])
    slots = [t[(c - 1) // block] * block + (c - 1) % block for t, c in zip(tables, ctx)] + [scratch * block]
    mask = (torch.arange(NB * block)[None, :] < ctx_t[:, None]).view(B, 1, 1, NB * block)
    from pdserve.engine.attention import AttentionMetadata

    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), static=StaticDecode(tab, mask))
    qp, kp, vp = (torch.cat([t, torch.randn(1, *t.shape[1:])]) for t in (q, k, v))  # a padding row
    got = paged_attention(qp, kp, vp, k_cache, v_cache, meta).view(B, h_q, d)
    torch.testing.assert_close(got[:3].reshape(3, -1), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[:scratch], ref_k[:scratch], rtol=0, atol=0)  # only the scratch block differs
    assert static_decode_attention(qp, k_cache, v_cache, meta.static).shape == (B, h_q, d)


def _run(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    worker = DecodeWorker(engine, DecodeOptions("prefill_priority", max_num_seqs=64, max_num_batched_tokens=2048))
    for i, p in enumerate(prompts):
        worker.submit(GenerateRequest(RequestId(f"g{i}"), tuple(p), GREEDY))
    out: dict[str, list[int]] = {f"g{i}": [] for i in range(len(prompts))}
    while worker.has_work():
        for o in worker.step():
            out[o.request_id].extend(o.token_ids)
    engine.allocator.check_integrity()
    return [out[f"g{i}"] for i in range(len(prompts))]


def _engine(path, device: str = "cpu") -> Engine:
    return Engine.from_config(str(path), EngineConfig(block_size=4, kv_cache_memory_gb=0.002, max_model_len=128,
                                                      device=device))  # type: ignore[arg-type]


def test_fixed_shape_decode_steps_give_the_same_tokens(tiny_llama_dir, tiny_qwen2_dir) -> None:
    """Whole generations with every decode step padded (5 requests → batch 8, then fewer as they
    finish), eagerly on CPU: tokens equal the ordinary engine's, and the padded step ran."""
    for path in (tiny_llama_dir, tiny_qwen2_dir):
        plain = _run(_engine(path), PROMPTS)
        engine = _engine(path)
        assert engine.runner.enable_decode_graphs(engine.max_model_len, capture=False)
        calls = []
        run = engine.runner.graphs.run
        engine.runner.graphs.run = lambda chunks: calls.append(len(chunks)) or run(chunks)  # type: ignore[method-assign]
        assert _run(engine, PROMPTS) == plain
        assert calls and max(calls) == len(PROMPTS)


def test_fixed_shape_logits_match_and_resize_rebuilds(tiny_llama_dir) -> None:
    engine = _engine(tiny_llama_dir)
    engine.runner.enable_decode_graphs(engine.max_model_len, capture=False)
    graphs = engine.runner.graphs
    engine.resize_pool(engine.allocator.num_blocks)
    assert engine.runner.graphs is not graphs and engine.runner.graphs.pool is engine.pool
    reqs = []
    for i, p in enumerate(PROMPTS[:3]):
        r = engine.add_request(GenerateRequest(RequestId(f"x{i}"), tuple(p), GREEDY))
        r.status = RequestStatus.RUNNING
        assert engine.ensure_blocks(r, len(p) + 1)
        engine.runner.execute([Chunk(r, len(p))])
        r.num_computed_tokens = len(p)
        r.output_token_ids.append(3)
        reqs.append(r)
    chunks = [Chunk(r, 1) for r in reqs]
    fixed = engine.runner.execute(chunks)
    ordinary = engine.runner.logits(chunks, engine.runner.forward(chunks))
    torch.testing.assert_close(fixed, ordinary, atol=1e-4, rtol=1e-4)


def test_tp_or_stage_models_keep_the_ordinary_step(tiny_llama_dir) -> None:
    from pdserve.engine.tp import apply_tp

    engine = _engine(tiny_llama_dir)
    apply_tp(engine.model, 0, 2)  # registers all-reduce hooks: a graph would skip them
    assert not engine.runner.enable_decode_graphs(engine.max_model_len, capture=False)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_on_gpu(tiny_llama_dir) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    graphed = Engine.from_config(str(tiny_llama_dir), EngineConfig(block_size=4, kv_cache_memory_gb=0.002,
                                                                  max_model_len=128, device="cuda", dtype="float32"))
    assert graphed.runner.graphs is not None and graphed.runner.graphs.capture
    eager = Engine.from_config(str(tiny_llama_dir), EngineConfig(block_size=4, kv_cache_memory_gb=0.002,
                                                                 max_model_len=128, device="cuda", dtype="float32",
                                                                 cuda_graphs=False))
    assert _run(graphed, PROMPTS) == _run(eager, PROMPTS)
    assert graphed.runner.graphs.graphs, "no graph was captured"
    assert all(b in GRAPH_BATCH_SIZES for b, _ in graphed.runner.graphs.graphs)
