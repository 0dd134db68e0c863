"""Decode steps replayed as CUDA graphs, at a few padded batch sizes (GPU only; off on CPU).

A decode step launches a few hundred small kernels (per layer: norms, projections, rotary, cache
write, attention, MLP); on a GPU the launches, not the math, set the step time at small batches.
The established servers capture the decode forward once per batch size and replay it. Here:

  - a step of n decodes (every chunk one token that samples) runs as the graph for (B, NB): B the
    smallest captured batch size >= n, NB the number of blocks per row rounded up to a power of
    two (capped by max_model_len), so a graph's attention gathers a bounded B × NB blocks;
  - rows n..B-1 are padding: token 0 at position 0, ctx 1, every block the pool's scratch block
    (KVPool.scratch_block, never allocated), so they write nowhere a request owns;
  - all inputs (ids, positions, slots, ctx lengths, block tables) are packed on the host into one
    pinned int64 tensor and copied with one non-blocking transfer into the static device buffer
    the graph reads; the attention mask is computed from ctx inside the graph;
  - graphs are captured lazily, the first time each (B, NB) is needed, into one shared memory
    pool; the graph's logits are static, so `run` returns a copy of the first n rows.

With `capture=False` the same padded, fixed-shape step runs eagerly on any device: that is how
the CPU tests check everything but the capture itself (tests/engine/test_cuda_graphs.py; the
capture is checked by the `gpu`-marked tests there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pdserve.engine.attention import AttentionMetadata, StaticDecode
from pdserve.engine.batch import Chunk
from pdserve.engine.kv_cache import KVPool
from pdserve.engine.model import LlamaForCausalLM

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
_FIELDS = 4  # ids, positions, slots, ctx: one int64 each per row, then the B × NB block table


def padded_batch(n: int, sizes: Sequence[int] = GRAPH_BATCH_SIZES) -> int | None:
    """The smallest captured batch size >= n, or None when n is larger than all of them."""
    return min((s for s in sizes if s >= n), default=None)


def blocks_bucket(num_blocks: int, max_blocks: int) -> int:
    """num_blocks rounded up to a power of two, at most max_blocks (and at least 1)."""
    b = 1
    while b < num_blocks:
        b *= 2
    return max(1, min(b, max_blocks))


def pack_inputs(chunks: Sequence[Chunk], B: int, NB: int, block_size: int, scratch_block: int,
                out: torch.Tensor) -> int:
    """Write one decode step's inputs into `out` (int64, CPU) as [ids | positions | slots | ctx |
    tables (B × NB)], padding rows n..B-1; returns the number of elements written."""
    rows = []
    for c in chunks:
        req = c.request
        pos = req.num_computed_tokens
        token = req.output_token_ids[-1] if req.output_token_ids else req.prompt_token_ids[-1]
        table = req.block_table[:NB]
        rows.append((token, pos, table[pos // block_size] * block_size + pos % block_size, pos + 1,
                     table + [scratch_block] * (NB - len(table))))
    pad = B - len(rows)
    ids = [r[0] for r in rows] + [0] * pad
    pos = [r[1] for r in rows] + [0] * pad
    slots = [r[2] for r in rows] + [scratch_block * block_size] * pad
    ctx = [r[3] for r in rows] + [1] * pad
    tables = [b for r in rows for b in r[4]] + [scratch_block] * (NB * pad)
    flat = ids + pos + slots + ctx + tables
    out[: len(flat)] = torch.tensor(flat, dtype=torch.long)
    return len(flat)


def unpack_inputs(buf: torch.Tensor, B: int, NB: int) -> tuple[torch.Tensor, ...]:
    """Views (ids, positions, slots, ctx, tables (B, NB)) of a buffer `pack_inputs` laid out."""
    ids, pos, slots, ctx = (buf[i * B:(i + 1) * B] for i in range(_FIELDS))
    return ids, pos, slots, ctx, buf[_FIELDS * B:_FIELDS * B + B * NB].view(B, NB)


class DecodeGraphs:
    """Runs all-decode steps of a whole model (one stage, no TP hooks) as fixed-shape steps."""

    def __init__(self, model: LlamaForCausalLM, pool: KVPool, max_model_len: int,
                 sizes: Sequence[int] = GRAPH_BATCH_SIZES, capture: bool | None = None) -> None:
        assert model.is_first and model.is_last, "CUDA graphs run a whole model, not a pipeline stage"
        self.model, self.pool = model, pool
        self.device = pool.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.sizes = tuple(sorted(sizes))
        self.block_size = pool.layout.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        cap = self.sizes[-1] * (_FIELDS + self.max_blocks)
        self.host = torch.empty(cap, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.dev = torch.empty(cap, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = torch.cuda.graph_pool_handle() if self.capture else None

    def supports(self, chunks: Sequence[Chunk]) -> bool:
        return (0 < len(chunks) <= self.sizes[-1] and all(c.num_tokens == 1 and c.samples for c in chunks)
                and all(c.request.num_computed_tokens < self.max_blocks * self.block_size for c in chunks))

    def run(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """Logits (n, vocab) of a decode step over `chunks` (check `supports` first)."""
        n = len(chunks)
        B = padded_batch(n, self.sizes)
        assert B is not None
        NB = blocks_bucket(max(c.request.num_computed_tokens // self.block_size + 1 for c in chunks), self.max_blocks)
        size = pack_inputs(chunks, B, NB, self.block_size, self.pool.scratch_block, self.host)
        self.dev[:size].copy_(self.host[:size], non_blocking=True)  # one transfer, from pinned memory on CUDA
        step = self._step_fn(B, NB)
        if not self.capture:
            return step()[:n]
        if (B, NB) not in self.graphs:
            self.graphs[(B, NB)] = self._capture(step)
        graph, logits = self.graphs[(B, NB)]
        graph.replay()
        return logits[:n].clone()  # the graph's output is overwritten by the next replay

    def _step_fn(self, B: int, NB: int) -> Callable[[], torch.Tensor]:
        ids, pos, slots, ctx, tables = unpack_inputs(self.dev, B, NB)
        span = NB * self.block_size

        def step() -> torch.Tensor:
            mask = (torch.arange(span, device=self.device)[None, :] < ctx[:, None]).view(B, 1, 1, span)
            meta = AttentionMetadata(slot_mapping=slots, static=StaticDecode(tables, mask))
            return self.model.compute_logits(self.model(ids, pos, meta, self.pool))

        return step

    @torch.inference_mode()
    def _capture(self, step: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (lazy init, fusing, allocator), as torch.cuda.graphs advises. The
        # warm-up forwards write the same K/V to the same slots the replay will: harmless.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            logits = step()
        return graph, logits
