"""Paged attention over a flat, mixed batch, in PyTorch ops (no custom kernel).

The batch holds B sequences; sequence b contributes q_len[b] new tokens (a whole prompt, a
prefill chunk, or 1 decode token) whose positions are the last q_len[b] of its ctx_len[b]
tokens. New K/V go into the pool at `slot_mapping`; then, per layer:

  - the decode rows (q_len == 1) attend in a few groups of similar context length: each group's
    blocks are gathered, padded to its longest context, and go through one SDPA call with one
    query per sequence (grouping keeps the padding small: decodes at contexts 20 and 500 padded
    together cost 2 x 500);
  - every sequence with several new tokens attends alone (a `Span`): a fresh prompt over its own
    new K/V with a causal SDPA (no gather, no mask), a chunk or a prompt after a cached prefix
    over its gathered blocks with an offset causal mask.

Padding prompts together instead would cost B·max_q·max_ctx per layer: a 24-token chunk beside 8
decodes made every decode row 24 queries long (2.6x the step), and prompts of 10 and 484 tokens
paid 484² each.

Two backends run the decode rows (`build_metadata(..., backend=)`):

  - "paged" (CPU, fp32/fp64, the default there): every decode row of the step in one pass that
    reads the cache in place, with no copy of any block. Row (sequence s, query head h) attends to
    the slots of s's blocks; those (row, slot) pairs form a CSR pattern over the layer's K table
    viewed as (num_slots * h_kv, d), so the scores are one sampled matmul
    (`torch.sparse.sampled_addmm`: q · K[slot] only at the pattern), the softmax runs on the
    scores scattered into a small (rows, max_ctx) buffer, and the output is one weighted
    `F.embedding_bag` over the V table (Σ p · V[slot] per row, the rows read where they lie).
    The pattern depends only on the block tables, so it is built once per step (`PagedDecode`)
    and reused by every layer. At 16 decodes of contexts 32-393 this is ~2x the grouped gather +
    SDPA below per layer; flex_attention with a block mask measured 11x slower on CPU, with a
    1.2 s mask build per step (BENCHMARKS.md §1).
    Where the native kernels build (CPU fp32, engine/kernels.py), the decode rows instead go to
    one native call per layer that walks the block tables itself (K row, then V row of each cached
    token, read once, in place) and, when every row is a decode, also writes the step's K/V: no
    pattern to build, and none of the sparse ops' ~30 µs of dispatch per layer. The composite
    above is what runs where the kernels cannot be built (counted: ModelRunner.num_fallback_steps).
    The kernels run the spans there too (`pd_prefill_attention_f32`, causal by position, so no
    mask): a 9-head, 64-dim prompt of 16-361 tokens in ~0.4x the time of the SDPA call below.
  - "reference" (any device): the groups above, gathered into a contiguous buffer per layer and
    run through SDPA with a padding mask. It is the oracle the tests hold "paged" to.

A fixed-shape all-decode step (`StaticDecode`, for CUDA graphs: engine/cuda_graphs.py) gathers a
fixed B × NB blocks and runs SDPA with the query heads of each KV head folded into queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine import kernels as native
from pdserve.engine.attention_metadata import (
    AttentionBackend,
    AttentionMetadata,
    DecodeGroup,
    PagedDecode,
    Span,
    StaticDecode,
    build_metadata,
    group_by_context,
    resolve_backend,
)

__all__ = ["AttentionBackend", "AttentionMetadata", "DecodeGroup", "PagedDecode", "Span", "StaticDecode",
           "build_metadata", "group_by_context", "paged_attention", "resolve_backend", "static_decode_attention"]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q (T, h_q, d), k/v (T, h_kv, d); caches (num_blocks, block_size, h_kv, d) → (T, h_q * d)."""
    T, h_q, d = q.shape
    h_kv = k.shape[1]
    num_blocks, block_size = k_cache.shape[:2]
    dec = meta.decode
    if dec is not None and dec.rows is None and dec.kernels is not None:  # all decodes: the kernel also writes K/V
        return native.decode_attention(dec.kernels, q, k_cache, v_cache, dec.tables, dec.ctx, (k, v)).view(T, h_q * d)
    k_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, meta.slot_mapping, v)
    gqa = h_q != h_kv
    if meta.static is not None:
        return static_decode_attention(q, k_cache, v_cache, meta.static).view(T, h_q * d)
    if dec is not None and dec.rows is None:  # every token is a decode, in order: nothing to scatter
        return _paged_decode_attention(q, k_cache, v_cache, dec).view(T, h_q * d)
    out = q.new_empty(T, h_q, d)
    if dec is not None:
        out.index_copy_(0, dec.rows, _paged_decode_attention(q.index_select(0, dec.rows), k_cache, v_cache, dec))
    for g in meta.groups:
        out[g.rows] = _decode_attention(q.index_select(0, g.rows), k_cache, v_cache, g, meta.gather_buf)
    native_spans = meta.kernels is not None and native.prefill_ok(meta.kernels, q)
    for s in meta.spans:
        rows = slice(s.q_start, s.q_start + s.q_len)
        if s.blocks is None:  # a fresh prompt: its keys are exactly its new tokens
            keys, vals = k[rows], v[rows]
        else:
            keys = k_cache.index_select(0, s.blocks).view(-1, h_kv, d)[: s.ctx_len]
            vals = v_cache.index_select(0, s.blocks).view(-1, h_kv, d)[: s.ctx_len]
        if native_spans:  # causal by position, no mask; K^T repacked once per KV head
            native.prefill_attention(meta.kernels, q[rows], keys, vals, out[rows])
            continue
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), vals.transpose(0, 1).unsqueeze(0),
            attn_mask=s.mask, is_causal=s.mask is None, enable_gqa=gqa,
        )  # (1, h_q, q_len, d)
        out[rows] = o[0].transpose(0, 1)
    return out.view(T, h_q * d)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: DecodeGroup,
                      gather_buf: torch.Tensor | None) -> torch.Tensor:
    """One query per decode sequence of group `g`, (n, h_q, d) → (n, h_q, d)."""
    n, max_blocks = g.block_tables.shape
    block_size, h_kv, d = k_cache.shape[1:]
    # index_select into a buffer reused across layers: ~5x faster than advanced indexing on CPU, and
    # a fresh multi-MB tensor per layer would pay page faults on every call.
    flat_tables = g.block_tables.flatten()
    if gather_buf is None:
        keys, vals = k_cache.index_select(0, flat_tables), v_cache.index_select(0, flat_tables)
    else:
        span = slice(g.buf_offset, g.buf_offset + flat_tables.numel())
        keys = torch.index_select(k_cache, 0, flat_tables, out=gather_buf[0, span])
        vals = torch.index_select(v_cache, 0, flat_tables, out=gather_buf[1, span])
    keys = keys.view(n, max_blocks * block_size, h_kv, d)[:, : g.max_ctx]  # (n, max_ctx, h_kv, d)
    vals = vals.view(n, max_blocks * block_size, h_kv, d)[:, : g.max_ctx]
    # A KV head's h_q / h_kv query heads as that many queries over its keys: grouped-query
    # attention without `enable_gqa`, which with a mask falls back to the math kernel on CUDA.
    out = F.scaled_dot_product_attention(
        q.reshape(n, h_kv, -1, d), keys.transpose(1, 2), vals.transpose(1, 2),  # (n, h_kv, len, d)
        attn_mask=g.mask,
    )  # (n, h_kv, h_q / h_kv, d)
    return out.reshape(n, -1, d)


def _paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            dec: PagedDecode) -> torch.Tensor:
    """One query per decode sequence, (n, h_q, d) → (n, h_q, d), reading K/V where they lie."""
    n, h_q, d = q.shape
    assert h_q == dec.num_heads, f"metadata built for {dec.num_heads} query heads, got {h_q}"
    if dec.kernels is not None:
        return native.decode_attention(dec.kernels, q, k_cache, v_cache, dec.tables, dec.ctx, None)
    assert dec.pattern is not None and dec.col is not None and dec.crow is not None and dec.scores is not None
    num_cols = dec.pattern.shape[1]
    keys = k_cache.view(-1, d)[:num_cols]  # (num_slots * h_kv, d): a view of the layer's cache
    vals = v_cache.view(-1, d)[:num_cols]
    scores = torch.sparse.sampled_addmm(dec.pattern, q.reshape(n * h_q, d), keys.t(), beta=0.0,
                                        alpha=d**-0.5).values()  # (nnz,) q · k at the pattern
    buf = dec.scores
    if dec.pos is None:
        probs = torch.softmax(scores.view_as(buf), dim=-1).view(-1)
    else:
        buf.fill_(float("-inf"))
        buf.view(-1).index_copy_(0, dec.pos, scores)
        probs = torch.softmax(buf, dim=-1).view(-1).index_select(0, dec.pos)
    # Σ_j p_j · V[col_j] per row: embedding_bag's weighted sum reads the V rows in place (2x a CSR
    # @ dense matmul here).
    out = F.embedding_bag(dec.col, vals, dec.crow, mode="sum", per_sample_weights=probs, include_last_offset=True)
    return out.view(n, h_q, d)


def static_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            st: StaticDecode) -> torch.Tensor:
    """(B, h_q, d) → (B, h_q, d) with shapes fixed by `st` and no host sync (capturable).

    The blocks are gathered (B × NB, a fixed size a graph can hold), and grouped-query attention
    runs without GQA support in SDPA: a KV head's h_q / h_kv query heads become that many queries
    over the same keys, so every SDPA backend that takes a mask applies (CUDA's memory-efficient
    kernel rather than the math fallback a masked `enable_gqa` call gets).
    """
    B, h_q, d = q.shape
    NB = st.block_tables.shape[1]
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    flat = st.block_tables.reshape(-1)
    keys = k_cache.index_select(0, flat).view(B, NB * block_size, h_kv, d).transpose(1, 2)  # (B, h_kv, L, d)
    vals = v_cache.index_select(0, flat).view(B, NB * block_size, h_kv, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.reshape(B, h_kv, h_q // h_kv, d), keys, vals, attn_mask=st.mask)
    return out.reshape(B, h_q, d)
