"""Offline API in vLLM's convention: `LLM(model).generate(prompts, SamplingParams(...))`.

It drives one colocated DecodeWorker (the same engine and scheduler the serving path runs)
synchronously until every request finishes, so what it returns is what `pdserve serve` streams.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch

from pdserve.config import EngineConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.types import GenerateRequest, RequestId, SamplingParams

Prompt = str | Sequence[int] | dict  # text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": [...]}
Params = SamplingParams | Sequence[SamplingParams] | None  # one for all prompts, or one per prompt


@dataclass(frozen=True)
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None


@dataclass(frozen=True, kw_only=True)
class LLMOptions:
    """How the offline engine is sized and placed; every field may also be passed to `LLM` as a keyword."""

    tensor_parallel_size: int = 1  # only 1: the offline API runs one process (serve a tp > 1 pool instead)
    max_model_len: int | None = None  # prompt + output tokens; None: EngineConfig's default
    kv_cache_memory_gb: float = 1.0  # KV cache size (GB) on the CPU, or on a GPU without gpu_memory_utilization
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # requests batched together
    max_num_batched_tokens: int = 2048  # tokens per step (prefill chunks + decodes)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on CUDA)
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int | None = None  # torch threads; None: every core

    def __post_init__(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size: the offline API runs one process; "
                             "use `pdserve serve` with a tp > 1 pool for tensor parallelism")

    def engine_config(self) -> EngineConfig:
        """The EngineConfig these options describe; raises ValueError naming a bad field."""
        return EngineConfig(block_size=self.block_size, dtype=self.dtype, device=self.device,  # type: ignore[arg-type]
                            kv_cache_memory_gb=self.kv_cache_memory_gb,
                            max_model_len=self.max_model_len or EngineConfig.max_model_len)

    @classmethod
    def of(cls, options: LLMOptions | None, overrides: dict[str, Any]) -> LLMOptions:
        """`options` (or the defaults) with `overrides` applied; ValueError names an unknown keyword."""
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{unknown[0]}: not an LLM option (known: {', '.join(f.name for f in fields(cls))})")
        return replace(options or cls(), **overrides)


class LLM:
    """`LLM("smollm2-135m", device="cpu")` or `LLM("smollm2-135m", LLMOptions(device="cpu"))`: keywords
    are LLMOptions fields (vLLM's names), applied over `options` when both are given."""

    def __init__(self, model: str = "smollm2-135m", options: LLMOptions | None = None, **overrides: Any) -> None:
        opts = LLMOptions.of(options, overrides)
        torch.set_num_threads(opts.num_threads or os.cpu_count() or 1)
        cfg = opts.engine_config()
        self.options, self.max_model_len = opts, cfg.max_model_len
        self.engine = Engine.from_config(model, cfg)
        self.tokenizer = self.engine.tokenizer
        scheduling = DecodeOptions("prefill_priority", opts.max_num_seqs, opts.max_num_batched_tokens)
        self._worker = DecodeWorker(self.engine, scheduling, worker_id="llm")
        self._counter = 0

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: Params = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for each prompt (text, token ids, or a vLLM prompt dict); outputs keep the input
        order. `sampling_params` is one for all prompts or a list with one per prompt; `use_tqdm`
        shows finished prompts on a progress bar (stderr), as vLLM's does."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = [self._encode(p) for p in prompts]  # type: ignore[union-attr]
        return self._run(ids, sampling_params, use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: Params = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        if self.tokenizer is None:
            raise ValueError("model: this model has no tokenizer, so no chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [self.tokenizer.encode_chat(c) for c in convs]  # type: ignore[arg-type]
        return self._run(ids, sampling_params, use_tqdm)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("prompt: a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _params(self, params: Params, prompts: list[list[int]]) -> list[SamplingParams]:
        """One SamplingParams per prompt; vLLM's max_tokens=None becomes what fits the context."""
        if params is None or isinstance(params, SamplingParams):
            each = [params or SamplingParams()] * len(prompts)
        else:
            each = list(params)
            if len(each) != len(prompts):
                raise ValueError(f"sampling_params: {len(each)} given for {len(prompts)} prompts")
        return [sp if sp.max_tokens is not None else sp.replace(max_tokens=max(1, self.max_model_len - len(p)))
                for sp, p in zip(each, prompts)]

    def _run(self, prompts: list[list[int]], params: Params, use_tqdm: bool = False) -> list[RequestOutput]:
        from tqdm import tqdm

        rids: list[RequestId] = []
        try:
            for p, sp in zip(prompts, self._params(params, prompts)):
                self._counter += 1  # ids are process-local: this worker serves only this LLM
                rid = RequestId(f"llm-{self._counter}")
                self._worker.submit(GenerateRequest(rid, tuple(p), sp))
                rids.append(rid)
        except ValueError:
            for rid in rids:  # all or nothing: an invalid prompt leaves no request behind
                self._worker.abort(rid)
            raise
        tokens: dict[RequestId, list[int]] = {r: [] for r in rids}
        texts: dict[RequestId, list[str]] = {r: [] for r in rids}
        reasons: dict[RequestId, str | None] = {}
        with tqdm(total=len(rids), desc="Processed prompts", unit="prompt", disable=not use_tqdm) as bar:
            while self._worker.has_work():
                for out in self._worker.step():
                    tokens[out.request_id].extend(out.token_ids)
                    texts[out.request_id].append(out.text)
                    if out.finished:
                        reasons[out.request_id] = out.finish_reason
                        bar.update(1)
        return [RequestOutput(p, tokens[r], "".join(texts[r]), reasons.get(r)) for p, r in zip(prompts, rids)]
