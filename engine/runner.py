"""ModelRunner: turns a batch of chunks into model inputs, runs one forward, returns logits.

It knows tensors, not requests' lifecycles: the engine advances state from what it returns.
On CPU fp32 its decode attention and the model's small matmuls run the native kernels
(engine/kernels.py); where they cannot be built, `native_fallback` is set, the reason is logged
once, and `num_fallback_steps` counts the steps that ran the slower torch/oneDNN path instead.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Sequence

import torch

from pdserve.engine import kernels
from pdserve.engine.attention import AttentionBackend, AttentionMetadata, build_metadata, resolve_backend
from pdserve.engine.batch import Chunk
from pdserve.engine.cuda_graphs import DecodeGraphs
from pdserve.engine.kv_cache import KVPool
from pdserve.engine.model import LayerHook, LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, attention_backend: AttentionBackend = "auto") -> None:
        self.model = model
        self.graphs: DecodeGraphs | None = None
        self._graph_args: tuple[int, bool | None] | None = None
        self.pool = pool
        self.device = pool.device
        self._gather = torch.empty(0)
        self.attention_backend = resolve_backend(attention_backend, self.device, pool.kv.dtype)
        cpu32 = self.device.type == "cpu" and pool.kv.dtype == torch.float32
        self.native = kernels.load() if cpu32 and model.native_kernels else None
        self.native_fallback = cpu32 and model.native_kernels and self.native is None
        self.num_fallback_steps = 0  # steps run without the native kernels where they were wanted
        if self.native is not None and next(model.parameters()).dtype == torch.float32:
            model.pack_for_native(self.native)
        # The loaded model, tokenizer and libraries are hundreds of thousands of long-lived objects;
        # moved out of the collector's generations, a step's garbage collections no longer walk them
        # (~5% of a batch-1 decode step here before; vLLM freezes after start-up too).
        gc.collect()
        gc.freeze()

    @property
    def pool(self) -> KVPool:
        return self._pool

    @pool.setter
    def pool(self, pool: KVPool) -> None:
        """A new pool (Engine.resize_pool) invalidates graphs captured over the old one."""
        self._pool = pool
        if self._graph_args is not None:
            self.graphs = DecodeGraphs(self.model, pool, self._graph_args[0], capture=self._graph_args[1])

    @pool.deleter
    def pool(self) -> None:
        """Drop the pool and the graphs captured over it (Engine.resize_pool frees the old pool before
        allocating the new one); `enable_decode_graphs`' settings are kept for the next pool."""
        del self._pool
        self.graphs = None

    def enable_decode_graphs(self, max_model_len: int, capture: bool | None = None) -> bool:
        """Run all-decode steps through DecodeGraphs (CUDA graphs on CUDA; `capture=False`: the same
        padded fixed-shape step, eagerly). Only for a whole model without forward hooks (no TP/PP)."""
        if not (self.model.is_first and self.model.is_last) or any(m._forward_hooks for m in self.model.modules()):
            return False
        self._graph_args = (max_model_len, capture)
        self.graphs = DecodeGraphs(self.model, self.pool, max_model_len, capture=capture)
        return True

    def _gather_buffer(self, num_blocks: int) -> torch.Tensor:
        """(2, num_blocks, block_size, h_kv, d) view of a grow-only workspace for attention's K/V gather."""
        lay = self.pool.layout
        shape = (2, num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)
        need = 2 * num_blocks * lay.block_size * lay.num_kv_heads * lay.head_dim
        if self._gather.numel() < need:
            self._gather = torch.empty(max(need, 2 * self._gather.numel()), dtype=self.pool.kv.dtype, device=self.device)
        return self._gather[:need].view(shape)

    def heads(self) -> tuple[int, int]:
        """(query heads, KV heads) of this rank's layers (TP shards them)."""
        attn = next(iter(self.model.model.layers.values())).self_attn
        return attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim

    def prepare(self, chunks: Sequence[Chunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat token ids (T,), positions (T,) and attention metadata for `chunks`."""
        ids: list[int] = []
        pos: list[int] = []
        q_lens, ctx_lens = [], []
        for c in chunks:
            req = c.request
            start = req.num_computed_tokens
            end = start + c.num_tokens
            if c.num_tokens == 1 and end == req.num_tokens:  # a decode: its last token, without copying all
                ids.append(req.output_token_ids[-1] if req.output_token_ids else req.prompt_token_ids[-1])
                pos.append(start)
            else:
                ids.extend(req.all_token_ids[start:end])
                pos.extend(range(start, end))
            q_lens.append(c.num_tokens)
            ctx_lens.append(end)
        h_q, h_kv = self.heads()
        meta = build_metadata(q_lens, ctx_lens, [c.request.block_table for c in chunks],
                              self.pool.layout.block_size, self.device, num_heads=h_q, num_kv_heads=h_kv,
                              backend=self.attention_backend,
                              kernels=self.native if self.attention_backend == "paged" else None)
        if self.native_fallback:
            self.num_fallback_steps += 1
        if meta.gather_blocks:
            meta = dataclasses.replace(meta, gather_buf=self._gather_buffer(meta.gather_blocks))
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        return as_long(ids), as_long(pos), meta

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk], hidden_in: torch.Tensor | None = None,
                layer_hook: LayerHook | None = None) -> torch.Tensor:
        """Hidden states (T, hidden) after this model's layers; `hidden_in` feeds a later pipeline stage."""
        ids, positions, meta = self.prepare(chunks)
        x = ids if hidden_in is None else hidden_in
        return self.model(x, positions, meta, self.pool, layer_hook)

    @torch.inference_mode()
    def logits(self, chunks: Sequence[Chunk], hidden: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """Logits (num_sampling_chunks, vocab) at each sampling chunk's last token, or (T, vocab)."""
        if not all_positions:
            ends = torch.tensor([c.num_tokens for c in chunks], device=hidden.device).cumsum(0) - 1
            rows = ends[torch.tensor([c.samples for c in chunks], device=hidden.device)]
            hidden = hidden.index_select(0, rows)
        return self.model.compute_logits(hidden)

    def execute(self, chunks: Sequence[Chunk], layer_hook: LayerHook | None = None,
                all_positions: bool = False) -> torch.Tensor:
        if self.graphs is not None and layer_hook is None and not all_positions and self.graphs.supports(chunks):
            with torch.inference_mode():
                return self.graphs.run(chunks)
        return self.logits(chunks, self.forward(chunks, layer_hook=layer_hook), all_positions)
