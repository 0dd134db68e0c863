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
    rep = H_Q // H_KV
    k, v = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
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
    torch.manual_seed(seed)
    shapes = [(1, 3), (1, 9), (1, 200), (1, 210), (1, 1), (17, 17), (6, 40), (1, 57)]  # (q_len, ctx_len)
    rng.shuffle(shapes)
    num_blocks = sum(-(-c // BLOCK) for _, c in shapes) + 4
    k_cache = torch.zeros(num_blocks, BLOCK, H_KV, D)
    v_cache = torch.zeros(num_blocks, BLOCK, H_KV, D)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables, full_k, full_v = [], [], []
    for ql, cl in shapes:
        table = [free.pop() for _ in range(-(-cl // BLOCK))]
        kk, vv = torch.randn(cl, H_KV, D), torch.randn(cl, H_KV, D)
        for p in range(cl - ql):  # the cached prefix is already in the pool
            k_cache[table[p // BLOCK], p % BLOCK] = kk[p]
            v_cache[table[p // BLOCK], p % BLOCK] = vv[p]
        tables.append(table)
        full_k.append(kk)
        full_v.append(vv)
    q = torch.randn(sum(ql for ql, _ in shapes), H_Q, D)
    new_k = torch.cat([kk[cl - ql:] for kk, (ql, cl) in zip(full_k, shapes)])
    new_v = torch.cat([vv[cl - ql:] for vv, (ql, cl) in zip(full_v, shapes)])
    meta = build_metadata([s[0] for s in shapes], [s[1] for s in shapes], tables, BLOCK, torch.device("cpu"),
                          num_heads=H_Q, num_kv_heads=H_KV, backend="paged" if native else backend, kernels=native)
    assert len(meta.spans) == 2
    if backend == "reference":
        assert len(meta.groups) >= 2 and meta.decode is None
    else:
        assert not meta.groups and meta.decode is not None and meta.decode.rows is not None
        assert (meta.decode.kernels is not None) == (backend == "native")
        assert (meta.decode.pattern is None) == (backend == "native")
    out = paged_attention(q, new_k, new_v, k_cache, v_cache, meta).view(-1, H_Q, D)
    start = 0
    for (ql, cl), kk, vv in zip(shapes, full_k, full_v):
        want = _dense(q[start:start + ql], kk, vv, cl)
        torch.testing.assert_close(out[start:start + ql], want, atol=1e-5, rtol=1e-5)
        start += ql


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
@pytest.mark.parametrize("h_q, h_kv", [(4, 4), (4, 2), (9, 3), (8, 1)])
@pytest.mark.parametrize("ctx", [[1], [37], [16, 16, 16], [3, 17, 200, 64, 65, 1, 128], [5 + 23 * i for i in range(16)]])
def test_paged_decode_matches_reference(ctx: list[int], h_q: int, h_kv: int, backend: str) -> None:
    """Decode rows read in place (CSR sampled matmul + SpMM, or the native kernel, which also writes
    the new K/V) against the gather + SDPA oracle: GQA ratios 1-8, one sequence, equal contexts (no
    padding), partial last blocks, unused blocks."""
    native = _kernels(backend)
    block, d = 16, 32
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
