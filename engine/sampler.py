"""Next-token sampling: greedy, temperature, top-k, top-p, and per-request seeds.

A seeded request draws token n from a generator seeded by (seed, n), so its tokens do not depend
on which instance samples them or what else is in the batch: disaggregated (first token on
prefill, the rest on decode) and colocated serving give the same seeded samples.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pdserve.types import SamplingParams


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int],
           generator: torch.Generator | None = None) -> list[int]:
    """logits (N, vocab) float32; positions[i] is the index the sampled token will take."""
    picked = logits.argmax(dim=-1)  # greedy rows: argmax, no softmax
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest prefix reaching top_p
            row = row.scatter(0, order[drop], float("-inf"))
        probs = row.softmax(-1)
        gen = generator
        if p.seed is not None:
            gen = torch.Generator(device=logits.device).manual_seed(_mix(p.seed, positions[i]))
        picked[i] = torch.multinomial(probs, 1, generator=gen)[0]  # stays on the device: no sync per row
    return picked.tolist()  # one host sync for the whole batch


def _mix(seed: int, position: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % (2**63 - 1)
