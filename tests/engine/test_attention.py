"""Paged attention on a mixed batch against dense per-sequence attention, and the decode grouping."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from pdserve.engine import kernels
from pdserve.engine.attention import build_metadata, group_by_context, paged_attention, resolve_backend

BLOCK, H_Q, H_KV, D = 4, 4, 2, 8


def _dense(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, ctx: int) -> torch.Tensor:
    """q (n, h_q, d) at the last n positions of a context of `ctx` tokens; keys/vals (ctx, h_kv, d)."""
    rep = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[2] ** 0.5
    pos = torch.arange(ctx - q.shape[0], ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _kernels(backend: str) -> kernels.Kernels | None:
    """"native": the paged backend run by engine/kernels.py (skipped where it cannot be built)."""
    if backend != "native":
        return None
    k = kernels.load()
    if k is None:
        pytest.skip(f"native kernels unavailable: {kernels.load_error()}")
    return k


@pytest.mark.parametrize("backend", ["reference", "paged", "native"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_batch_equals_dense_attention(seed: int, backend: str) -> None:
    """Decodes at very different contexts (several groups), a fresh prompt, a chunk after a cached
    prefix and a one-token-context decode, in one shuffled batch."""
    native = _kernels(backend)
    rng = random.Random(seed)
    shapes = [(1, 3), (1, 9), (1, 200), (1, 210), (1, 1), (17, 17), (6, 40), (1, 57)]  # (q_len, ctx_len)
    rng.shuffle(shapes)
    k_cache, v_cache, tables, q, new_k, new_v, full = _mixed_batch(shapes, H_Q, H_KV, D, seed)
    meta = build_metadata([s[0] for s in shapes], [s[1] for s in shapes], tables, BLOCK, torch.device("cpu"),
                          num_heads=H_Q, num_kv_heads=H_KV, backend="paged" if native else backend, kernels=native)
    assert len(meta.spans) == 2
    if backend == "reference":
        assert len(meta.groups) >= 2 and meta.decode is None
    else:
        assert not meta.groups and meta.decode is not None and meta.decode.rows is not None
        assert (meta.decode.kernels is not None) == (backend == "native")
        assert (meta.decode.pattern is None) == (backend == "native")
    _assert_dense(paged_attention(q, new_k, new_v, k_cache, v_cache, meta), q, shapes, full)


def _mixed_batch(shapes: list[tuple[int, int]], h_q: int, h_kv: int, d: int, seed: int):
    """Caches holding each (q_len, ctx_len) sequence's cached prefix in shuffled blocks, their
    tables, the step's q (rows strided, as a fused projection's view is) and new K/V, and every
    sequence's full K/V."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = sum(-(-c // BLOCK) for _, c in shapes) + 4
    k_cache = torch.zeros(num_blocks, BLOCK, h_kv, d)
    v_cache = torch.zeros(num_blocks, BLOCK, h_kv, d)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables, full = [], []
    for ql, cl in shapes:
        table = [free.pop() for _ in range(-(-cl // BLOCK))]
        kk, vv = torch.randn(cl, h_kv, d), torch.randn(cl, h_kv, d)
        for p in range(cl - ql):  # the cached prefix is already in the pool
            k_cache[table[p // BLOCK], p % BLOCK] = kk[p]
            v_cache[table[p // BLOCK], p % BLOCK] = vv[p]
        tables.append(table)
        full.append((kk, vv))
    q = torch.randn(sum(ql for ql, _ in shapes), h_q + 1, d)[:, :h_q]
    new_k = torch.cat([kk[cl - ql:] for (kk, _), (ql, cl) in zip(full, shapes)])
    new_v = torch.cat([vv[cl - ql:] for (_, vv), (ql, cl) in zip(full, shapes)])
    return k_cache, v_cache, tables, q, new_k, new_v, full


def _assert_dense(out: torch.Tensor, q: torch.Tensor, shapes: list[tuple[int, int]], full: list) -> None:
    out = out.view(q.shape)
    start = 0
    for (ql, cl), (kk, vv) in zip(shapes, full):
        want = _dense(q[start:start + ql], kk, vv, cl)
        torch.testing.assert_close(out[start:start + ql], want, atol=1e-5, rtol=1e-5)
        start += ql


@pytest.mark.parametrize("seed", [0, 1])
def test_native_prompt_attention_equals_dense(seed: int) -> None:
    """Where d is a multiple of the kernels' panel width, the native kernel runs the spans too:
    fresh prompts of 1-70 tokens (queries in fours and the rest, key tiles past the first) and
    chunks after a cached prefix, grouped-query heads, beside decodes."""
    native = _kernels("native")
    h_q, h_kv, d = 6, 2, native.panel_rows
    shapes = [(1, 3), (2, 2), (3, 3), (5, 5), (17, 17), (70, 70), (6, 40), (9, 130), (1, 57)]
    random.Random(seed).shuffle(shapes)
    k_cache, v_cache, tables, q, new_k, new_v, full = _mixed_batch(shapes, h_q, h_kv, d, seed)
    meta = build_metadata([s[0] for s in shapes], [s[1] for s in shapes], tables, BLOCK, torch.device("cpu"),
                          num_heads=h_q, num_kv_heads=h_kv, backend="paged", kernels=native)
    assert meta.kernels is native and len(meta.spans) == 7
    assert kernels.prefill_ok(native, q) and not kernels.prefill_ok(native, q[..., :8])
    _assert_dense(paged_attention(q, new_k, new_v, k_cache, v_cache, meta), q, shapes, full)


def test_group_by_context_is_the_cheapest_partition() -> None:
    rng = random.Random(0)
    for _ in range(40):
        ctx = [rng.choice([1, 5, 30, 31, 200, 220, 900]) + rng.randrange(3) for _ in range(rng.randrange(1, 7))]
        def cost(groups: list[list[int]], ctx: list[int] = ctx) -> int:
            return sum(len(g) * max(ctx[i] for i in g) + 64 for g in groups)

        got = group_by_context(ctx, 64)
        assert sorted(i for g in got for i in g) == list(range(len(ctx)))
        order = sorted(range(len(ctx)), key=ctx.__getitem__)
        best = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(ctx),))])
                   for r in range(len(ctx)) for cuts in itertools.combinations(range(1, len(ctx)), r))
        assert cost(got) == best
    assert len(group_by_context([100, 101, 102, 103])) == 1  # similar contexts: one call
    assert len(group_by_context([10, 2000])) == 2  # padding 10 to 2000 costs more than a call
    assert group_by_context([]) == []
    big = [rng.randrange(1, 4000) for _ in range(500)]  # a large batch: runs of sorted units
    groups = group_by_context(big)
    assert sorted(i for g in groups for i in g) == list(range(500))
    assert all(max(big[i] for i in a) <= min(big[i] for i in b) for a, b in itertools.pairwise(groups))


def _decode_batch(ctx: list[int], h_q: int, h_kv: int, d: int, block: int, seed: int, extra_blocks: int = 0):
    """Caches holding sequences of contexts `ctx` (the last token new) in shuffled blocks, tables
    with `extra_blocks` unused blocks allocated ahead, and the step's q/k/v."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    need = [-(-c // block) + extra_blocks for c in ctx]
    num_blocks = sum(need) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables = [[ids.pop() for _ in range(k)] for k in need]
    k_cache = torch.randn(num_blocks, block, h_kv, d)  # garbage everywhere a sequence does not own
    v_cache = torch.randn(num_blocks, block, h_kv, d)
    q, k, v = torch.randn(len(ctx), h_q, d), torch.randn(len(ctx), h_kv, d), torch.randn(len(ctx), h_kv, d)
    return tables, k_cache, v_cache, q, k, v


@pytest.mark.parametrize("backend", ["paged", "native"])
@pytest.mark.parametrize("h_q, h_kv", [(4, 4), (4, 2), (9, 3), (4, 1), (8, 1)])
@pytest.mark.parametrize("ctx", [[1], [37], [16, 16, 16], [3, 17, 200, 64, 65, 1, 128], [5 + 23 * i for i in range(16)]])
@pytest.mark.parametrize("d, block", [(32, 16), (64, 16), (64, 32), (64, 8)])
def test_paged_decode_matches_reference(ctx: list[int], h_q: int, h_kv: int, d: int, block: int, backend: str) -> None:
    """Decode rows read in place (CSR sampled matmul + SpMM, or the native kernel, which also writes
    the new K/V) against the gather + SDPA oracle: GQA ratios 1-8, one sequence, equal contexts (no
    padding), partial last blocks, unused blocks; head sizes and block sizes on both sides of the
    native kernel's fast path (d = 64 with blocks of a multiple of 16 tokens and <= 4 query heads per
    KV head) and its general one."""
    native = _kernels(backend)
    tables, k_cache, v_cache, q, k, v = _decode_batch(ctx, h_q, h_kv, d, block, seed=len(ctx) + h_q, extra_blocks=1)
    outs = {}
    for name in ("reference", backend):
        kc, vc = k_cache.clone(), v_cache.clone()
        meta = build_metadata([1] * len(ctx), ctx, tables, block, torch.device("cpu"), num_heads=h_q,
                              num_kv_heads=h_kv, backend="reference" if name == "reference" else "paged",
                              kernels=None if name == "reference" else native)
        outs[name] = (paged_attention(q, k, v, kc, vc, meta), kc, vc)
    torch.testing.assert_close(outs[backend][0], outs["reference"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[backend][1], outs["reference"][1], rtol=0, atol=0)  # same KV written
    torch.testing.assert_close(outs[backend][2], outs["reference"][2], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["paged", "native"])
def test_paged_metadata_is_reused_across_layers(backend: str) -> None:
    """One step's metadata drives every layer: two layers' caches through the same `meta`."""
    native = _kernels(backend)
    ctx, h_q, h_kv, d, block = [9, 40, 17], 6, 2, 16, 8
    tables, k0, v0, q, k, v = _decode_batch(ctx, h_q, h_kv, d, block, seed=5)
    _, k1, v1, q1, kk1, vv1 = _decode_batch(ctx, h_q, h_kv, d, block, seed=6)
    paged = build_metadata([1] * 3, ctx, tables, block, torch.device("cpu"), num_heads=h_q, num_kv_heads=h_kv,
                           backend="paged", kernels=native)
    for args in ((q, k, v, k0, v0), (q1, kk1, vv1, k1, v1)):
        ref = build_metadata([1] * 3, ctx, tables, block, torch.device("cpu"))
        want = paged_attention(*[a.clone() for a in args], ref)
        torch.testing.assert_close(paged_attention(*args, paged), want, atol=1e-5, rtol=1e-5)


def test_resolve_backend() -> None:
    assert resolve_backend("auto", "cpu", torch.float32) == "paged"
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "reference"
    assert resolve_backend("auto", "cuda", torch.float32) == "reference"
    assert resolve_backend("reference", "cpu", torch.float32) == "reference"
