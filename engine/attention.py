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
  - "reference" (any device): the groups above, gathered into a contiguous buffer per layer and
    run through SDPA with a padding mask. It is the oracle the tests hold "paged" to.

A fixed-shape all-decode step (`StaticDecode`, for CUDA graphs: engine/cuda_graphs.py) gathers a
fixed B × NB blocks and runs SDPA with the query heads of each KV head folded into queries.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# Building a CSR tensor warns once per process that sparse CSR is in beta; the op used here
# (sampled_addmm) is checked against the reference path by tests/engine.
warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")

AttentionBackend = Literal["auto", "paged", "reference"]


@dataclass(frozen=True)
class Span:
    """One sequence with several new tokens: flat tokens [q_start, q_start + q_len)."""

    q_start: int
    q_len: int
    ctx_len: int
    blocks: torch.Tensor | None  # block ids holding [0, ctx_len); None for a fresh prompt (ctx_len == q_len)
    mask: torch.Tensor | None  # (q_len, ctx_len) True where query may attend; None when causal


@dataclass(frozen=True)
class DecodeGroup:
    """Decode sequences padded together: one query each, contexts padded to `max_ctx`."""

    rows: torch.Tensor  # (n,) flat token index of each sequence's query
    block_tables: torch.Tensor  # (n, max_blocks) padded with block 0
    mask: torch.Tensor  # (n, 1, 1, max_ctx) True where the query may attend
    max_ctx: int
    buf_offset: int  # first block of this group's slice of the gather buffer


@dataclass(frozen=True)
class PagedDecode:
    """Every decode row of a step for the "paged" backend: a CSR pattern over the K/V tables.

    Row r = s * h_q + h (decode sequence s, query head h) holds the ctx_len[s] columns
    slot * h_kv + h // (h_q / h_kv), one per cached token of s in position order, where the
    layer's K (or V) cache is viewed as a (num_slots * h_kv, d) table.
    """

    rows: torch.Tensor | None  # (n,) flat token index of each decode query; None: the batch is these n rows in order
    num_heads: int  # h_q the pattern was built for
    pattern: torch.Tensor  # sparse CSR (n * h_q, num_slots * h_kv), values all zero
    crow: torch.Tensor  # (n * h_q + 1,) the pattern's row offsets
    col: torch.Tensor  # (nnz,) its column indices
    pos: torch.Tensor | None  # (nnz,) index of each pattern entry in the (n * h_q, max_ctx) buffer; None: no padding
    scores: torch.Tensor  # (n * h_q, max_ctx) softmax workspace reused by every layer


@dataclass(frozen=True)
class StaticDecode:
    """A decode step with fixed shapes (a CUDA graph replays it): B rows, NB blocks each.

    Rows past the real batch are padding: ctx 1, every block the pool's scratch block. Everything
    here is a device tensor the graph reads at replay, so nothing depends on host values.
    """

    block_tables: torch.Tensor  # (B, NB) block ids
    mask: torch.Tensor  # (B, 1, 1, NB * block_size) True where the query may attend (j < ctx)


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) flat slot = block_id * block_size + offset, per new token
    groups: tuple[DecodeGroup, ...] = ()
    spans: tuple[Span, ...] = ()
    gather_blocks: int = 0  # blocks the decode groups gather per layer, together
    gather_buf: torch.Tensor | None = None  # (2, gather_blocks, block_size, h_kv, d) reused by every layer
    decode: PagedDecode | None = None  # the decode rows when the "paged" backend runs them (then no groups)
    static: StaticDecode | None = None  # a fixed-shape all-decode step (CUDA graphs); then nothing else is set


# What one more group costs per layer (a gather and an SDPA call), in padded context tokens; it
# keeps a batch of similar contexts in one call and splits a batch of mixed ones.
GROUP_COST_TOKENS = 64


def group_by_context(ctx_lens: Sequence[int], cost_tokens: int = GROUP_COST_TOKENS,
                     max_units: int = 64) -> list[list[int]]:
    """Indices of `ctx_lens` split into groups minimising Σ (size × longest) + cost per group: a
    partition of the sorted lengths into runs by dynamic programme, exact up to `max_units`
    sequences; a larger batch is cut into `max_units` equal runs first (O(max_units²) per step)."""
    order = sorted(range(len(ctx_lens)), key=ctx_lens.__getitem__)
    n = len(order)
    step = -(-n // max_units) if n > max_units else 1
    ends = list(range(step, n, step)) + [n] if n else []  # unit k covers order[ends[k-1]:ends[k]]
    starts = [0] + ends[:-1]
    best = [0.0] + [float("inf")] * len(ends)  # best[u]: cost of the first u units
    cut = [0] * (len(ends) + 1)
    for u in range(1, len(ends) + 1):
        longest = ctx_lens[order[ends[u - 1] - 1]]
        for v in range(u):  # the last group is units v..u-1
            c = best[v] + (ends[u - 1] - starts[v]) * longest + cost_tokens
            if c < best[u]:
                best[u], cut[u] = c, v
    groups, u = [], len(ends)
    while u > 0:
        groups.append(order[starts[cut[u]]:ends[u - 1]])
        u = cut[u]
    return groups[::-1]


def resolve_backend(backend: AttentionBackend, device: torch.device | str, dtype: torch.dtype) -> str:
    """"auto" → "paged" where its sparse kernels run (CPU, fp32/fp64), else "reference"."""
    if backend != "auto":
        return backend
    return "paged" if torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64) else "reference"


def build_metadata(q_lens: Sequence[int], ctx_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
                   block_size: int, device: torch.device, *, num_heads: int | None = None,
                   num_kv_heads: int | None = None, backend: str = "reference") -> AttentionMetadata:
    """Index tensors for one step. Interval map of sequence b's tokens:

        [0, ctx_len - q_len)        already in the cache (computed by earlier steps or pulled)
        [ctx_len - q_len, ctx_len)  new this step: flat tokens [q_start, q_start + q_len)

    backend "paged" (needs the head counts) runs the decode rows in place; "reference" groups them.
    """
    slots: list[int] = []
    decodes: list[tuple[int, int, Sequence[int]]] = []  # (flat row, context, blocks)
    spans: list[Span] = []
    q_start = 0
    for b, (ql, cl, table) in enumerate(zip(q_lens, ctx_lens, block_tables)):
        assert len(table) * block_size >= cl, f"seq {b}: {len(table)} blocks cannot hold {cl} tokens"
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(cl - ql, cl))
        if ql == 1:
            decodes.append((q_start, cl, table))
        elif ql == cl:
            spans.append(Span(q_start, ql, cl, None, None))
        else:
            n = -(-cl // block_size)
            i = torch.arange(ql)[:, None]
            j = torch.arange(cl)[None, :]
            spans.append(Span(q_start, ql, cl, torch.tensor(table[:n], dtype=torch.long, device=device),
                              (j <= i + (cl - ql)).to(device)))
        q_start += ql
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
    if backend == "paged" and decodes:
        assert num_heads is not None and num_kv_heads is not None, "the paged backend needs the head counts"
        rows = None if len(decodes) == q_start else torch.tensor([r for r, _, _ in decodes], dtype=torch.long, device=device)
        return AttentionMetadata(slot_mapping=slot_mapping, spans=tuple(spans),
                                 decode=_paged_decode([cl for _, cl, _ in decodes], [t for _, _, t in decodes],
                                                      rows, block_size, num_heads, num_kv_heads, device))
    groups: list[DecodeGroup] = []
    offset = 0
    for members in group_by_context([cl for _, cl, _ in decodes]):
        rows = [decodes[m][0] for m in members]
        ctx = [decodes[m][1] for m in members]
        max_ctx = max(ctx)
        max_blocks = -(-max_ctx // block_size)
        tables = torch.zeros((len(members), max_blocks), dtype=torch.long)
        for r, m in enumerate(members):
            table = decodes[m][2][:max_blocks]
            tables[r, : len(table)] = torch.tensor(table, dtype=torch.long)
        mask = torch.arange(max_ctx)[None, :] < torch.tensor(ctx)[:, None]
        groups.append(DecodeGroup(torch.tensor(rows, dtype=torch.long, device=device), tables.to(device),
                                  mask[:, None, None, :].to(device), max_ctx, offset))
        offset += tables.numel()
    return AttentionMetadata(slot_mapping=slot_mapping, groups=tuple(groups), spans=tuple(spans), gather_blocks=offset)


def _paged_decode(ctx: Sequence[int], tables: Sequence[Sequence[int]], rows: torch.Tensor | None, block_size: int,
                  h_q: int, h_kv: int, device: torch.device) -> PagedDecode:
    """The CSR pattern of `PagedDecode` for decode sequences with contexts `ctx`, built with a
    handful of tensor ops (no Python loop over tokens)."""
    n, max_ctx = len(ctx), max(ctx)
    max_blocks = -(-max_ctx // block_size)
    table = torch.tensor([list(t[:max_blocks]) + [0] * (max_blocks - len(t[:max_blocks])) for t in tables],
                         dtype=torch.long).view(n, max_blocks)
    j = torch.arange(max_ctx)
    slots = table[:, j // block_size] * block_size + j % block_size  # (n, max_ctx)
    cols = slots[:, None, :] * h_kv + (torch.arange(h_q) // (h_q // h_kv))[None, :, None]  # (n, h_q, max_ctx)
    ctx_t = torch.tensor(ctx, dtype=torch.long)
    crow = torch.zeros(n * h_q + 1, dtype=torch.long)
    torch.cumsum(ctx_t.repeat_interleave(h_q), 0, out=crow[1:])
    if min(ctx) == max_ctx:  # no padding: the pattern's values are the (rows, max_ctx) buffer itself
        col, pos = cols.reshape(-1), None
    else:
        valid = (j[None, :] < ctx_t[:, None])[:, None, :].expand(n, h_q, max_ctx).reshape(-1)
        col = cols.reshape(-1)[valid]
        pos = valid.nonzero().squeeze(1).to(device)
    width = (max(max(t[:max_blocks]) for t in tables) + 1) * block_size * h_kv  # covers every column used
    crow, col = crow.to(device), col.to(device)
    pattern = torch.sparse_csr_tensor(crow, col, torch.zeros(col.numel(), device=device),
                                      size=(n * h_q, width), device=device, check_invariants=False)
    return PagedDecode(rows, h_q, pattern, crow, col, pos, torch.empty(n * h_q, max_ctx, device=device))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q (T, h_q, d), k/v (T, h_kv, d); caches (num_blocks, block_size, h_kv, d) → (T, h_q * d)."""
    T, h_q, d = q.shape
    h_kv = k.shape[1]
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, meta.slot_mapping, v)
    gqa = h_q != h_kv
    if meta.static is not None:
        return static_decode_attention(q, k_cache, v_cache, meta.static).view(T, h_q * d)
    dec = meta.decode
    if dec is not None and dec.rows is None:  # every token is a decode, in order: nothing to scatter
        return _paged_decode_attention(q, k_cache, v_cache, dec).view(T, h_q * d)
    out = q.new_empty(T, h_q, d)
    if dec is not None:
        out.index_copy_(0, dec.rows, _paged_decode_attention(q.index_select(0, dec.rows), k_cache, v_cache, dec))
    for g in meta.groups:
        out[g.rows] = _decode_attention(q.index_select(0, g.rows), k_cache, v_cache, g, meta.gather_buf)
    for s in meta.spans:
        rows = slice(s.q_start, s.q_start + s.q_len)
        if s.blocks is None:  # a fresh prompt: its keys are exactly its new tokens
            keys, vals = k[rows], v[rows]
        else:
            keys = k_cache.index_select(0, s.blocks).view(-1, h_kv, d)[: s.ctx_len]
            vals = v_cache.index_select(0, s.blocks).view(-1, h_kv, d)[: s.ctx_len]
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
