"""Conditional disaggregation: per request, prefill on the prefill pool and pull the KV, or let the
chosen decode instance prefill the (short) uncached part of the prompt itself.

A pure function of what the router knows at dispatch: how many prompt tokens the decode instance
does not hold (its prefix cache, as `PrefixIndex` guesses it), how much prompt work waits on the
prefill pool, and how many prompt tokens the decode instance can add to its steps without
breaking its TPOT budget. The rule follows the published conditional-disaggregation deciders
(NVIDIA Dynamo's: remote prefill only when the uncached prompt is longer than a threshold and the
prefill queue is not saturated), with the decode instance's slack as a guard, so a local prefill
never lands on a decode instance that has no room for it. The threshold is what `pdserve plan`
chooses; 0 means "always disaggregate" (today's behaviour), and a threshold at the context length
means colocated serving on the decode pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdserve.types import LatencyBreakdown

# why: few uncached tokens; prefill pool saturated / without a healthy instance; too many uncached
# tokens; no room on the decode instance; the rule is off
PDReason = Literal["short", "prefill_saturated", "no_prefill", "long", "no_decode_slack", "disabled"]


@dataclass(frozen=True)
class PDDecision:
    """What was decided and from what; carried in the request's breakdown and counted in metrics."""

    local: bool  # True: the decode instance prefills; False: prefill pool + KV transfer
    reason: PDReason
    uncached_tokens: int  # prompt tokens the decode instance does not hold
    prefill_queue_tokens: int  # prompt tokens queued or running on the least-loaded prefill instance
    decode_slack_tokens: int  # prompt tokens the decode instance can take per step within its budget

    def latency(self) -> LatencyBreakdown:
        """The decision as the request's breakdown carries it (pdserve_timings' pd_* keys)."""
        return LatencyBreakdown(pd_local=self.local, pd_reason=self.reason, pd_uncached_tokens=self.uncached_tokens,
                                pd_prefill_queue_tokens=self.prefill_queue_tokens,
                                pd_decode_slack_tokens=self.decode_slack_tokens)


@dataclass(frozen=True)
class PDRule:
    """`threshold_tokens`: prefill locally when at most this many prompt tokens are uncached.
    `prefill_queue_limit`: above this many queued prefill tokens the pool counts as saturated, and a
    longer suffix is still prefilled locally when the decode instance has slack for it."""

    threshold_tokens: int = 0
    prefill_queue_limit: int | None = None

    def __post_init__(self) -> None:
        if self.threshold_tokens < 0:
            raise ValueError(f"router.pd_threshold_tokens: must be >= 0, got {self.threshold_tokens}")
        if self.prefill_queue_limit is not None and self.prefill_queue_limit < 0:
            raise ValueError(f"router.pd_prefill_queue_limit: must be >= 0, got {self.prefill_queue_limit}")

    @property
    def enabled(self) -> bool:
        """False for the defaults (threshold 0, no queue limit): every request to the prefill pool."""
        return self.threshold_tokens > 0 or self.prefill_queue_limit is not None

    def decide(self, uncached_tokens: int, prefill_queue_tokens: int, decode_slack_tokens: int) -> PDDecision:
        def out(local: bool, reason: PDReason) -> PDDecision:
            return PDDecision(local, reason, uncached_tokens, prefill_queue_tokens, decode_slack_tokens)

        if not self.enabled:
            return out(False, "disabled")
        if decode_slack_tokens <= 0:
            return out(False, "no_decode_slack")
        if uncached_tokens <= self.threshold_tokens:
            return out(True, "short")
        if self.prefill_queue_limit is not None and prefill_queue_tokens > self.prefill_queue_limit:
            return out(True, "prefill_saturated")
        return out(False, "long")
