"""Dispatch policies: pure functions of (request, stats snapshots, dispatch number) -> instance id.

The `Router` hands a policy only the healthy instances of one pool, with the fields it tracks itself
(outstanding prompt tokens, requests in flight) already folded into the snapshots, and a counter it
increments per dispatch (round robin's only state). No clocks, no I/O. Pick one by name with
`prefill_policy(name)` / `decode_policy(name)`; names are the `RouterConfig` literals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pdserve.types import GenerateRequest, WorkerStats

Policy = Callable[[GenerateRequest, Sequence[WorkerStats], int], str]

# Decode instances whose KV usage is within this many points of the least-used one count as equally
# loaded; among them the fewest running + waiting requests wins. Usage is polled, so it lags a burst
# of dispatches, while the running count is updated by the router at each dispatch.
KV_USAGE_TOLERANCE = 0.05
# Cache-aware decode dispatch follows a prefix only to instances at most this many running + waiting
# requests above the least loaded one (SGLang's cache-aware router bounds the imbalance the same way),
# so one popular conversation cannot pile every request onto one instance.
PREFIX_LOAD_SLACK = 2


def least_outstanding_tokens(req: GenerateRequest, stats: Sequence[WorkerStats], tick: int) -> str:
    """Prefill: the instance with the fewest prompt tokens queued or running (Vidur's LOR idea:
    prefill time grows with tokens, not requests). Ties go to fewer waiting, then to `tick` order."""
    assert stats, "policy called with no candidates"
    n = len(stats)
    best = min(range(n), key=lambda i: (stats[i].outstanding_tokens, stats[i].num_waiting, (i - tick) % n))
    return stats[best].worker_id


def least_kv_pressure(req: GenerateRequest, stats: Sequence[WorkerStats], tick: int) -> str:
    """Decode: the least KV-memory pressure, then the fewest running + waiting requests.

    KV usage decides admission on a decode instance (a pull waits for free blocks), so the emptiest
    pool minimises the wait; the request count breaks near-ties so a burst spreads out.
    """
    assert stats, "policy called with no candidates"
    floor = min(s.kv_usage for s in stats)
    near = [i for i, s in enumerate(stats) if s.kv_usage <= floor + KV_USAGE_TOLERANCE]
    n = len(stats)
    best = min(near, key=lambda i: (stats[i].num_running + stats[i].num_waiting, stats[i].kv_usage, (i - tick) % n))
    return stats[best].worker_id


def cache_aware_prefill(req: GenerateRequest, stats: Sequence[WorkerStats], tick: int) -> str:
    """Prefill with a prefix cache: the least prompt work queued once this request is added, its
    cached prefix (`expected_hit_tokens`, the router's guess) not counted as work. Without hits it is
    `least_outstanding_tokens`."""
    assert stats, "policy called with no candidates"
    n, prompt = len(stats), len(req.prompt_token_ids)
    best = min(range(n), key=lambda i: (stats[i].outstanding_tokens + prompt - min(prompt, stats[i].expected_hit_tokens),
                                        stats[i].num_waiting, (i - tick) % n))
    return stats[best].worker_id


def cache_aware_decode(req: GenerateRequest, stats: Sequence[WorkerStats], tick: int) -> str:
    """Decode with a prefix cache: among the instances `least_kv_pressure` would accept (KV usage near
    the least) and at most PREFIX_LOAD_SLACK requests busier than the least busy of those, the one
    holding the longest prefix of the request (fewest tokens to transfer or recompute), then the
    least busy."""
    assert stats, "policy called with no candidates"
    floor = min(s.kv_usage for s in stats)
    near = [i for i, s in enumerate(stats) if s.kv_usage <= floor + KV_USAGE_TOLERANCE]
    load = {i: stats[i].num_running + stats[i].num_waiting for i in near}
    idle = min(load.values())
    near = [i for i in near if load[i] <= idle + PREFIX_LOAD_SLACK]
    n = len(stats)
    best = min(near, key=lambda i: (-stats[i].expected_hit_tokens, load[i], stats[i].kv_usage, (i - tick) % n))
    return stats[best].worker_id


def round_robin(req: GenerateRequest, stats: Sequence[WorkerStats], tick: int) -> str:
    """Each instance in turn, whatever its load (the baseline the others are compared with)."""
    assert stats, "policy called with no candidates"
    return stats[tick % len(stats)].worker_id


_PREFILL: dict[str, Policy] = {"least_tokens": least_outstanding_tokens, "cache_aware": cache_aware_prefill,
                               "round_robin": round_robin}
_DECODE: dict[str, Policy] = {"least_kv": least_kv_pressure, "cache_aware": cache_aware_decode,
                              "round_robin": round_robin}


def prefill_policy(name: str) -> Policy:
    if name not in _PREFILL:
        raise ValueError(f"router.prefill_policy: unknown policy {name!r} (known: {', '.join(_PREFILL)})")
    return _PREFILL[name]


def decode_policy(name: str) -> Policy:
    if name not in _DECODE:
        raise ValueError(f"router.decode_policy: unknown policy {name!r} (known: {', '.join(_DECODE)})")
    return _DECODE[name]
