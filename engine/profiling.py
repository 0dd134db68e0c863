"""Measures the engine's step time for a batch shape, on whatever device it runs: the input of
`pdserve profile`, which fits the placement latency model to these numbers.

Each measurement allocates fake requests, runs real forwards over the real KV cache, and frees
everything again; the first repeat warms up and is discarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from pdserve.engine.batch import Chunk
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, RequestStatus
from pdserve.types import RequestId, SamplingParams


def _fake_requests(engine: Engine, lens: Sequence[int], computed: Sequence[int]) -> list[Request]:
    reqs = []
    vocab = engine.model_config.vocab_size
    for i, (n, c) in enumerate(zip(lens, computed)):
        r = Request(RequestId(f"profile-{i}"), [(7 * j + i) % vocab for j in range(n)], SamplingParams())
        r.status = RequestStatus.RUNNING
        if not engine.ensure_blocks(r, n):
            for q in reqs:
                engine.free(q)
            raise ValueError(f"profile: batch of {sum(lens)} tokens does not fit the KV cache")
        r.num_computed_tokens = c
        reqs.append(r)
    return reqs


def time_step(engine: Engine, lens: Sequence[int], computed: Sequence[int], repeats: int = 3,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds for one forward over sequences of total lengths `lens` of which `computed` tokens
    are already in the cache (a prompt: 0; a decode: len - 1; a chunk: anything between).
    `clock=time.process_time` counts this process's CPU time (one thread, a shared machine)."""
    reqs = _fake_requests(engine, lens, computed)
    chunks = [Chunk(r, n - c) for r, n, c in zip(reqs, lens, computed)]
    try:
        times = []
        for _ in range(repeats + 1):
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            engine.runner.execute(chunks)
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(clock() - t0)
        return sorted(times[1:])[len(times[1:]) // 2]  # median of the measured repeats
    finally:
        for r in reqs:
            engine.free(r)


def time_prefill(engine: Engine, prompt_lens: list[int], repeats: int = 3) -> float:
    """Seconds for one batched prefill of prompts with these lengths."""
    return time_step(engine, prompt_lens, [0] * len(prompt_lens), repeats)


def time_decode(engine: Engine, context_lens: list[int], repeats: int = 3) -> float:
    """Seconds for one batched decode step of sequences with these context lengths (incl. the new token)."""
    return time_step(engine, context_lens, [n - 1 for n in context_lens], repeats)
