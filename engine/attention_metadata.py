"""AttentionMetadata: what one step's attention needs to know about its batch (which flat token
belongs to which sequence, where new K/V go, how decode rows are read), built once per step by
`build_metadata` and shared by every layer. engine/attention.py describes the two backends."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pdserve.engine.kernels import Kernels

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
    """Every decode row of a step for the "paged" backend, read from the K/V tables in place.

    With the native kernels (engine/kernels.py) the kernel walks `tables` itself. Otherwise a CSR
    pattern drives torch's sparse ops: row r = s * h_q + h (decode sequence s, query head h) holds
    the ctx_len[s] columns slot * h_kv + h // (h_q / h_kv), one per cached token of s in position
    order, where the layer's K (or V) cache is viewed as a (num_slots * h_kv, d) table.
    """

    rows: torch.Tensor | None  # (n,) flat token index of each decode query; None: the batch is these n rows in order
    num_heads: int  # h_q the metadata was built for
    tables: torch.Tensor  # (n, max_blocks) int64 block ids, padded with block 0
    ctx: torch.Tensor  # (n,) int64 context lengths
    kernels: Kernels | None = None  # the native kernels run these rows; then no CSR pattern below
    pattern: torch.Tensor | None = None  # sparse CSR (n * h_q, num_slots * h_kv), values all zero
    crow: torch.Tensor | None = None  # (n * h_q + 1,) the pattern's row offsets
    col: torch.Tensor | None = None  # (nnz,) its column indices
    pos: torch.Tensor | None = None  # (nnz,) each entry's index in the (n * h_q, max_ctx) buffer; None: no padding
    scores: torch.Tensor | None = None  # (n * h_q, max_ctx) softmax workspace reused by every layer


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
    kernels: Kernels | None = None  # the native kernels run the spans' attention too ("paged" backend, CPU fp32)


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
                   num_kv_heads: int | None = None, backend: str = "reference",
                   kernels: Kernels | None = None) -> AttentionMetadata:
    """Index tensors for one step. Interval map of sequence b's tokens:

        [0, ctx_len - q_len)        already in the cache (computed by earlier steps or pulled)
        [ctx_len - q_len, ctx_len)  new this step: flat tokens [q_start, q_start + q_len)

    backend "paged" (needs the head counts) runs the decode rows in place, by the native `kernels`
    when given (CPU fp32), which then also run the spans; "reference" groups the decode rows.
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
        return AttentionMetadata(slot_mapping=slot_mapping, spans=tuple(spans), kernels=kernels,
                                 decode=_paged_decode([cl for _, cl, _ in decodes], [t for _, _, t in decodes],
                                                      rows, block_size, num_heads, num_kv_heads, device, kernels))
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
    return AttentionMetadata(slot_mapping=slot_mapping, groups=tuple(groups), spans=tuple(spans), gather_blocks=offset,
                             kernels=kernels if backend == "paged" else None)


def _paged_decode(ctx: Sequence[int], tables: Sequence[Sequence[int]], rows: torch.Tensor | None, block_size: int,
                  h_q: int, h_kv: int, device: torch.device, kernels: Kernels | None) -> PagedDecode:
    """`PagedDecode` for decode sequences with contexts `ctx`: the block tables for the native
    kernel, else the CSR pattern, built with a handful of tensor ops (no Python loop over tokens)."""
    n, max_ctx = len(ctx), max(ctx)
    max_blocks = -(-max_ctx // block_size)
    table = torch.tensor([list(t[:max_blocks]) + [0] * (max_blocks - len(t[:max_blocks])) for t in tables],
                         dtype=torch.long).view(n, max_blocks)
    ctx_t = torch.tensor(ctx, dtype=torch.long)
    if kernels is not None:
        return PagedDecode(rows, h_q, table, ctx_t, kernels)
    j = torch.arange(max_ctx)
    slots = table[:, j // block_size] * block_size + j % block_size  # (n, max_ctx)
    cols = slots[:, None, :] * h_kv + (torch.arange(h_q) // (h_q // h_kv))[None, :, None]  # (n, h_q, max_ctx)
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
    return PagedDecode(rows, h_q, table.to(device), ctx_t.to(device), None, pattern, crow, col, pos,
                       torch.empty(n * h_q, max_ctx, device=device))
