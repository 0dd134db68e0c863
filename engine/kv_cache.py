"""Paged KV cache: the layout contract, the block allocator (ids and ref counts), the tensor pool.

Two levels, as in SGLang's memory pool: `BlockAllocator` hands out block ids and counts their
owners; `KVPool` holds the tensors those ids index. `KVLayout` is the whole contract the
KV-transfer layer sees: a block of layer l is `pool.kv[l, :, block_id]`, shape
(2, block_size, num_kv_heads, head_dim), k at index 0 and v at index 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class KVLayout:
    """Shape of one worker's KV cache. With TP/PP it describes this rank's shard only."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        assert self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}"
        assert min(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size) > 0, self

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block across all layers: (num_layers, 2, block_size, num_kv_heads, head_dim)."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


class BlockAllocator:
    """Hands out block ids with reference counts. Pure bookkeeping, no tensors.

    Invariant: a block is either free (ref 0, in `_free`) or owned (ref >= 1, not in `_free`).
    `fork` adds an owner (prefix sharing, or a KV export pinning blocks while decode pulls).
    """

    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0, "a KV cache needs at least one block"
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self._free), f"asked for {n} blocks, {len(self._free)} free"
        ids = [self._free.pop() for _ in range(n)]
        for b in ids:
            self._ref[b] = 1
        return ids

    def fork(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            assert self._ref[b] > 0, f"fork of free block {b}"
            self._ref[b] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            assert self._ref[b] > 0, f"double free of block {b}"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def check_integrity(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b, r in enumerate(self._ref):
            assert r >= 0, f"block {b} has negative ref count {r}"
            assert (r == 0) == (b in free), f"block {b}: ref {r} but free={b in free}"


class KVPool:
    """The cache tensors: `kv` has shape (num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim).

    Blocks [0, num_blocks) are the allocator's. The last one, `scratch_block`, is never handed out:
    the padded rows of a CUDA-graph decode step (engine/cuda_graphs.py) write their K/V there.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        self.kv = torch.zeros(
            (layout.num_layers, 2, num_blocks + 1, layout.block_size, layout.num_kv_heads, layout.head_dim),
            dtype=layout.torch_dtype, device=device,
        )

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) views of layer i, each (num_blocks, block_size, num_kv_heads, head_dim)."""
        return self.kv[i, 0], self.kv[i, 1]

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy of the given blocks: (num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim)."""
        idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.kv.device)
        return self.kv.index_select(2, idx)

    def scatter(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Inverse of `gather`: write `blocks` (same shape as gather's result) into the given ids."""
        idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.kv.device)
        self.kv.index_copy_(2, idx, blocks.to(self.kv.device, self.kv.dtype))


def num_blocks_for_budget(layout: KVLayout, budget_bytes: int) -> int:
    """How many blocks fit in a memory budget (at least one)."""
    return max(1, budget_bytes // layout.bytes_per_block)
