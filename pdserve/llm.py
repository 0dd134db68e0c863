"""Offline API in vLLM's convention: `LLM(model).generate(prompts, SamplingParams(...))`.

It drives one colocated DecodeWorker (the same engine and scheduler the serving path runs)
synchronously until every request finishes, so what it returns is what `pdserve serve` streams.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

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


class LLM:
    def __init__(self, model: str = "smollm2-135m", tensor_parallel_size: int = 1, *,
                 max_model_len: int | None = None, kv_cache_memory_gb: float = 1.0, block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, dtype: str = "auto",
                 device: str = "auto", num_threads: int | None = None) -> None:
        if tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size: the offline API runs one process; "
                             "use `pdserve serve` with a tp > 1 pool for tensor parallelism")
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        cfg = EngineConfig(block_size=block_size, dtype=dtype, device=device,  # type: ignore[arg-type]
                           kv_cache_memory_gb=kv_cache_memory_gb,
                           max_model_len=max_model_len or EngineConfig.max_model_len)
        self.max_model_len = cfg.max_model_len
        self.engine = Engine.from_config(model, cfg)
        self.tokenizer = self.engine.tokenizer
        options = DecodeOptions("prefill_priority", max_num_seqs, max_num_batched_tokens)
        self._worker = DecodeWorker(self.engine, options, worker_id="llm")
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
