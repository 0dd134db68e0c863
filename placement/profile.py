"""`pdserve profile`: measure the engine on this hardware over a grid of batch sizes and lengths,
fit the latency model (fit.py), and write a profile file (profile_file.py's format).

The grid mirrors DistServe's profiler, scaled by a token budget so it stays affordable on a CPU:
every (batch size, length) pair whose batch holds at most `max_batch_tokens` tokens. Only
`measure_engine` touches the engine (imported lazily, so the rest of placement stays torch-free).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pdserve.placement.fit import DecodeSample, FitReport, PrefillSample, fit_profile
from pdserve.placement.latency import PhaseProfile
from pdserve.placement.profile_file import profile_to_json

BATCH_SIZES = (1, 2, 3, 4, 8, 16, 32, 64, 96, 128, 160, 192)
LENGTHS = (4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512, 768, 1024, 1536, 2020)
# Decode at every small batch size: on CPUs (and small GPUs) the step time is not linear in B there.
DECODE_BATCH_SIZES = tuple(range(1, 17)) + (24, 32, 48, 64, 96, 128, 160, 192)
DECODE_CONTEXTS = (16, 128, 512, 2020)


@dataclass(frozen=True, kw_only=True)
class Grid:
    """Prefill: b prompts of length n for every (b, n) with b·n <= max_batch_tokens. Decode: one
    step of b sequences at context n for every (b, n) with b·n <= max_decode_tokens."""

    batch_sizes: tuple[int, ...] = BATCH_SIZES
    lengths: tuple[int, ...] = LENGTHS
    max_batch_tokens: int = 8192
    max_len: int = 2048
    decode_batch_sizes: tuple[int, ...] = DECODE_BATCH_SIZES
    decode_contexts: tuple[int, ...] = DECODE_CONTEXTS
    max_decode_tokens: int = 16384

    @classmethod
    def quick(cls, **kw: int) -> Grid:
        """A coarse grid (about a quarter of the points) for a first profile in minutes."""
        return cls(batch_sizes=(1, 2, 4, 8, 16, 32, 64), lengths=(16, 64, 128, 256, 512, 1024, 2020),
                   decode_batch_sizes=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128), decode_contexts=(128, 1024), **kw)

    def costs(self) -> list[float]:
        """Relative cost of each point, prefill then decode (tokens computed plus a fixed step
        cost of 32 tokens; a decode token over its context ≈ 1/64 of a prefill token per context token)."""
        return ([b * n + 32.0 for b, n in self.points()]
                + [b * (1 + n / 64) + 32.0 for b, n in self.decode_points()])

    def points(self) -> list[tuple[int, int]]:
        """Prefill (batch size, length) pairs in the budget, cheapest first."""
        return _pairs(self.batch_sizes, self.lengths, self.max_len, self.max_batch_tokens)

    def decode_points(self) -> list[tuple[int, int]]:
        """Decode (batch size, context length) pairs in the budget, cheapest first."""
        return _pairs(self.decode_batch_sizes, self.decode_contexts, self.max_len, self.max_decode_tokens)


def _pairs(batch_sizes: Sequence[int], lengths: Sequence[int], max_len: int, budget: int) -> list[tuple[int, int]]:
    pts = [(b, n) for b in batch_sizes for n in lengths if n <= max_len and b * n <= budget]
    return sorted(pts, key=lambda bn: bn[0] * bn[1])


Timer = Callable[[list[int]], float]  # seconds for one batched forward at these lengths


def measure(grid: Grid, time_prefill: Timer, time_decode: Timer,
            progress: Callable[[int, int], None] | None = None) -> tuple[list[PrefillSample], list[DecodeSample]]:
    """Prefill of b prompts of length n, and one decode step of b sequences at context n."""
    pre: list[PrefillSample] = []
    dec: list[DecodeSample] = []
    prefill_points, decode_points = grid.points(), grid.decode_points()
    total = len(prefill_points) + len(decode_points)
    for i, (b, n) in enumerate(prefill_points):
        pre.append(PrefillSample((n,) * b, time_prefill([n] * b)))
        if progress:
            progress(i + 1, total)
    for i, (b, n) in enumerate(decode_points):
        dec.append(DecodeSample((n,) * b, time_decode([n] * b)))
        if progress:
            progress(len(prefill_points) + i + 1, total)
    return pre, dec


def fit_and_write(path: str | Path, model_key: str, tp: int, prefill: Sequence[PrefillSample],
                  decode: Sequence[DecodeSample], large_batch_threshold: int = 95,
                  device: str | None = None) -> tuple[PhaseProfile, dict[str, FitReport]]:
    """Fit and merge into the profile file at `path` (other models/TPs in it are kept)."""
    profile, report = fit_profile(prefill, decode, large_batch_threshold)
    write_profile(path, model_key, tp, profile, device)
    return profile, report


def write_profile(path: str | Path, model_key: str, tp: int, profile: PhaseProfile, device: str | None = None) -> None:
    """Merge one (model, TP) entry into the profile file at `path`; `device` ("cpu"/"cuda", where
    it was measured) lets `pdserve plan` plan a CPU deployment from a CPU profile."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    entry = profile_to_json({model_key: {tp: profile}})[model_key]
    if device:
        entry[str(tp)]["device"] = device
    data.setdefault(model_key, {}).update(entry)
    path.write_text(json.dumps(data, indent=2) + "\n")


def measure_engine(model: str, grid: Grid, repeats: int = 3, progress: Callable[[int, int], None] | None = None
                   ) -> tuple[list[PrefillSample], list[DecodeSample], str]:
    """Run the real engine (one process, TP 1) over `grid`; also returns its device type ("cpu",
    "cuda"). Imports the engine here only."""
    import torch

    from pdserve.config import EngineConfig
    from pdserve.engine.engine import Engine
    from pdserve.engine.profiling import time_decode, time_prefill

    torch.set_num_threads(1)
    engine = Engine.from_config(model, EngineConfig(max_model_len=grid.max_len + 1))
    pre, dec = measure(grid, lambda lens: time_prefill(engine, lens, repeats),
                       lambda lens: time_decode(engine, lens, repeats), progress)
    return pre, dec, engine.device.type
