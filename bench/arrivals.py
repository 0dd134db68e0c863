"""Request arrival times: Poisson, or Gamma inter-arrivals with a chosen coefficient of variation.

Gamma with shape 1/CV^2 and scale CV^2/rate has mean 1/rate and CV as given; CV = 1 is the
Poisson process (exponential gaps), CV > 1 is burstier, CV = 0 is a fixed gap. vLLM's
`--burstiness b` is the Gamma shape, i.e. CV = 1/sqrt(b). A rate of inf sends everything at t=0.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_times(num_requests: int, rate: float, cv: float = 1.0, seed: int = 0) -> list[float]:
    """Offsets in seconds from the start of the run, non-decreasing, the first one 0."""
    if rate <= 0:
        raise ValueError(f"rate: must be > 0 req/s, got {rate}")
    if cv < 0:
        raise ValueError(f"cv: must be >= 0, got {cv}")
    if num_requests <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * num_requests
    if cv == 0:
        gaps = np.full(num_requests - 1, 1.0 / rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=1.0 / cv**2, scale=cv**2 / rate, size=num_requests - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def cv_from_burstiness(burstiness: float) -> float:
    if burstiness <= 0:
        raise ValueError(f"burstiness: must be > 0, got {burstiness}")
    return 1.0 / math.sqrt(burstiness)
