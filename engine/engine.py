"""Engine: model + paged KV cache + sampler, advancing requests one scheduled batch at a time.

Both roles run this class. It does not decide what runs, nor when a request ends: the schedulers
in prefill/ and decode/ do (they give blocks through `ensure_blocks`, run `step(batch)`, then
append the sampled tokens, apply the stop conditions and free the blocks of the requests that
ended, with `engine.request.append_token` and `free`). A request whose KV arrives from elsewhere
gets its blocks and `num_computed_tokens` set by the decode scheduler and continues exactly as if
this engine had computed it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from pdserve.config import EngineConfig
from pdserve.engine.batch import Batch
from pdserve.engine.device import bind_thread, checkpoint_dtype, resolve_device_dtype
from pdserve.engine.kv_cache import BlockAllocator, KVLayout, KVPool, num_blocks_for_budget
from pdserve.engine.prefix_cache import PrefixCachingAllocator
from pdserve.engine.memory import num_blocks_from_device_memory
from pdserve.engine.model import LayerHook, LlamaForCausalLM, ModelConfig, RotaryEmbedding
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampler import sample
from pdserve.engine.step_log import StepLog
from pdserve.engine.tp import apply_tp
from pdserve.engine.weights import load_checkpoint
from pdserve.prefix_keys import chain_keys
from pdserve.types import GenerateRequest, RequestId, StepOutput, StepRecord


class Engine:
    def __init__(self, model: LlamaForCausalLM, cfg: EngineConfig, tokenizer: Any = None,
                 eos_token_ids: frozenset[int] = frozenset(), cache_namespace: str = "") -> None:
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.cache_namespace = cache_namespace  # the model's identity: prefix-cache keys of other models differ
        self.model_config: ModelConfig = model.config
        self.eos_token_ids = eos_token_ids
        self.device = next(model.parameters()).device
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.max_model_len = min(cfg.max_model_len, self.model_config.max_position_embeddings)
        attn = next(iter(model.model.layers.values())).self_attn
        self.layout = KVLayout(
            num_layers=model.end - model.start,
            num_kv_heads=attn.k_proj.out_features // attn.head_dim,
            head_dim=attn.head_dim, block_size=cfg.block_size, dtype=dtype,
        )
        if self.device.type == "cuda" and cfg.gpu_memory_utilization is not None:
            num_blocks = num_blocks_from_device_memory(model, self.layout, self.device, cfg.gpu_memory_utilization,
                                                       self.max_model_len)
        else:
            num_blocks = num_blocks_for_budget(self.layout, int(cfg.kv_cache_memory_gb * 1e9))
        self.pool = KVPool(self.layout, num_blocks, self.device)
        self.allocator = self._new_allocator(num_blocks)
        self.runner = ModelRunner(model, self.pool, cfg.attention_backend)
        if cfg.cuda_graphs and self.device.type == "cuda":
            self.runner.enable_decode_graphs(self.max_model_len)
        # Cumulative step accounting, read by the workers' stats (engine time as serving sees it).
        self.busy_s, self.num_steps, self.num_step_tokens = 0.0, 0, 0
        self.step_log = StepLog()  # each step's shape and time, for an in-situ latency profile

    @classmethod
    def from_config(cls, model: str, cfg: EngineConfig | None = None,
                    layer_range: tuple[int, int] | None = None) -> Engine:
        """Load `model` (a name or an HF directory); TP/PP ranks use PipelineEngine.load instead."""
        cfg = cfg or EngineConfig()
        net, tokenizer, eos = load_model(model, cfg, layer_range)
        return cls(net, cfg, tokenizer, eos, cache_namespace=model)

    def resize_pool(self, num_blocks: int) -> None:
        """Reallocate the KV cache with `num_blocks` blocks (before any request holds one): the
        ranks of one TP/PP instance agree on a common size so their allocations stay identical."""
        assert self.allocator.num_used == 0, "resize_pool with blocks in use"
        del self.pool, self.runner.pool  # free the old pool before allocating the new one (no 2x peak)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.pool = KVPool(self.layout, num_blocks, self.device)
        self.allocator = self._new_allocator(num_blocks)
        self.runner.pool = self.pool

    def _new_allocator(self, num_blocks: int) -> BlockAllocator:
        return PrefixCachingAllocator(num_blocks) if self.cfg.enable_prefix_caching else BlockAllocator(num_blocks)

    # ---- admission -------------------------------------------------------------------------

    def add_request(self, req: GenerateRequest) -> Request:
        """Validate and wrap a request; raises ValueError naming the bad field. Allocates nothing."""
        n = len(req.prompt_token_ids) + len(req.output_token_ids)
        if not req.prompt_token_ids:
            raise ValueError("prompt: must contain at least one token")
        if n >= self.max_model_len:
            raise ValueError(f"prompt: {n} tokens leave no room to generate (max_model_len {self.max_model_len})")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_token_ids):
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        if req.sampling.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a model with a tokenizer")
        r = Request(req.request_id, list(req.prompt_token_ids), req.sampling,
                    output_token_ids=list(req.output_token_ids), arrival_s=req.arrival_s)
        if self.tokenizer is not None:
            from pdserve.tokenizer import IncrementalDetokenizer

            r.detokenizer = IncrementalDetokenizer(self.tokenizer, r.prompt_token_ids, req.sampling.stop)
            for t in r.output_token_ids:  # carried over (prefill's first token, or a re-dispatch): rebuild
                r.detokenizer.add([t])  # the state its previous holder had, held-back text included; that
                # holder already emitted the text, so it is dropped here
        return r

    def reuse_prefix(self, req: Request, max_tokens: int | None = None) -> int:
        """Start a request that holds no blocks on the longest cached prefix of its tokens: take a
        reference on those blocks and count them computed. At least one token is left to compute (its
        logits sample the next token), and at most `max_tokens`. Returns the tokens reused (0 without prefix caching, or when
        the rest of the request would not fit next to the reused blocks)."""
        alloc = self.allocator
        if not isinstance(alloc, PrefixCachingAllocator) or req.block_table or req.num_computed_tokens:
            return 0
        bs = self.layout.block_size
        limit = req.num_tokens - 1 if max_tokens is None else min(req.num_tokens - 1, max_tokens)
        keys = chain_keys(req.all_token_ids[:limit], bs, self.cache_namespace, req.block_keys)[:limit // bs]
        hits = alloc.lookup(keys)
        if not hits or not alloc.can_allocate(alloc.num_unreferenced(hits) + self.blocks_needed(req, req.num_tokens)
                                              - len(hits)):
            return 0
        alloc.acquire(hits)
        req.block_table = list(hits)
        req.num_computed_tokens, req.num_keyed_blocks = len(hits) * bs, len(hits)
        req.num_prefix_hit_tokens = max(req.num_prefix_hit_tokens, min(req.num_computed_tokens, req.num_prompt_tokens))
        return req.num_computed_tokens

    def counters(self) -> dict[str, float | int]:
        """Cumulative engine figures for `WorkerStats` (keyword names are its fields)."""
        alloc, bs = self.allocator, self.layout.block_size
        cached = isinstance(alloc, PrefixCachingAllocator)
        return {"busy_s": self.busy_s, "num_steps": self.num_steps, "num_step_tokens": self.num_step_tokens,
                "prefix_cache_queried_tokens": alloc.num_queried_blocks * bs if cached else 0,
                "prefix_cache_hit_tokens": alloc.num_hit_blocks * bs if cached else 0,
                "num_fallback_steps": self.runner.num_fallback_steps}

    def cache_computed(self, req: Request) -> None:
        """Key the full blocks whose KV is now computed, so later prompts can reuse them."""
        alloc, bs = self.allocator, self.layout.block_size
        full, done = req.num_computed_tokens // bs, req.num_keyed_blocks
        if not isinstance(alloc, PrefixCachingAllocator) or full <= done:
            return  # nothing new: the per-step cost is this check until another block fills
        keys = chain_keys(req.all_token_ids[:full * bs], bs, self.cache_namespace, req.block_keys)
        alloc.register(req.block_table[done:full], keys[done:full])
        req.num_keyed_blocks = full

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        """Extra blocks `req` needs for its table to cover `num_tokens` tokens."""
        return max(0, self.layout.num_blocks_for(num_tokens) - len(req.block_table))

    def ensure_blocks(self, req: Request, num_tokens: int) -> bool:
        """Grow `req`'s block table to cover `num_tokens`; False (and no change) if memory is short."""
        need = self.blocks_needed(req, num_tokens)
        if not self.allocator.can_allocate(need):
            return False
        req.block_table.extend(self.allocator.allocate(need))
        return True

    # ---- execution -------------------------------------------------------------------------

    def step(self, batch: Batch, layer_hook: LayerHook | None = None) -> list[tuple[Request, int]]:
        """Run one forward over `batch` and move each chunk's `num_computed_tokens` on; return
        (request, sampled token) for each chunk that sampled, in batch order. `layer_hook(layer)`
        runs after each layer's KV is written (layer-wise KV streaming)."""
        for c in batch.chunks:
            assert c.request.status is RequestStatus.RUNNING, f"{c.request.request_id} is {c.request.status}"
            assert len(c.request.block_table) * self.layout.block_size >= c.request.num_computed_tokens + c.num_tokens
        sampling = [c.request for c in batch.chunks if c.samples]  # before num_computed_tokens moves
        bind_thread(self.device)  # the step thread's current CUDA device is this engine's (per thread)
        wall, t0 = time.time(), time.perf_counter()
        tokens = self.execute(batch, layer_hook)
        elapsed = time.perf_counter() - t0
        self.busy_s += elapsed
        self.step_log.append(StepRecord(wall, elapsed, tuple(c.num_tokens for c in batch.chunks),
                                        tuple(c.request.num_computed_tokens for c in batch.chunks)))
        self.num_steps += 1
        self.num_step_tokens += batch.num_tokens
        for c in batch.chunks:
            c.request.num_computed_tokens += c.num_tokens
            self.cache_computed(c.request)
        return list(zip(sampling, tokens, strict=True))

    def execute(self, batch: Batch, layer_hook: LayerHook | None = None) -> list[int]:
        """The forward and the sampling: one token per sampling chunk. Pipeline/TP ranks override this."""
        logits = self.runner.execute(batch.chunks, layer_hook)
        sampling = [c for c in batch.chunks if c.samples]
        return sample(logits, [c.request.sampling for c in sampling], [c.request.num_tokens for c in sampling])

    def free(self, req: Request) -> None:
        """Release the request's reference to its blocks (a KV export keeps its own)."""
        self.allocator.free(req.block_table)
        req.block_table = []
        req.num_computed_tokens = req.num_keyed_blocks = 0


def failed_step_outputs(worker_id: str, request_ids: list[RequestId], e: Exception) -> list[StepOutput]:
    """One error output per request of a batch whose step raised (engine.step moves no request state
    before the forward and sampling return, so its requests can be aborted cleanly)."""
    error = f"step failed on {worker_id}: {type(e).__name__}: {e}"
    return [StepOutput(rid, (), finish_reason="error", error=error) for rid in dict.fromkeys(request_ids)]


def load_model(model: str, cfg: EngineConfig, layer_range: tuple[int, int] | None = None,
               tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None,
               ) -> tuple[LlamaForCausalLM, Any, frozenset[int]]:
    """(model stage with weights, tokenizer or None, eos token ids) for `model`, on cfg's device/dtype.

    The stage is built on `meta` and TP-sharded there, then each weight is read as this rank's
    slice in the target dtype straight onto the device (engine/weights.py): a rank's peak memory is
    its shard."""
    from pdserve.models import resolve_model

    path = resolve_model(model)
    hf = json.loads((path / "config.json").read_text())
    mcfg = ModelConfig.from_hf(hf)
    device, dtype = resolve_device_dtype(cfg, checkpoint_dtype(hf))
    max_positions = min(cfg.max_model_len, mcfg.max_position_embeddings)
    with torch.device("meta"):
        net = LlamaForCausalLM(mcfg, max_positions, layer_range)
    apply_tp(net, tp_rank, tp_size, tp_group)
    load_checkpoint(net, path, getattr(torch, dtype), device, tp_rank, tp_size)
    with torch.device(device):  # rope tables are computed (fp32, then cast like HF), not loaded
        net.rope = RotaryEmbedding(mcfg, max_positions).to(getattr(torch, dtype))
    net.eval()
    tokenizer, eos = _load_tokenizer(path, hf)
    return net, tokenizer, eos


def _load_tokenizer(path: Path, hf: dict[str, Any]) -> tuple[Any, frozenset[int]]:
    eos = hf.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if not (path / "tokenizer.json").exists():
        return None, frozenset(ids)
    from pdserve.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(path)
    return tok, frozenset(ids | set(tok.eos_token_ids))
