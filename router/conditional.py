"""Conditional disaggregation at dispatch: the decode instance first, then whether it prefills the
request itself or the prefill pool does and the KV is pulled (the rule: router/pd_decision.py).

`ConditionalDispatch.decide` gathers the rule's inputs from what the router tracks, before any
prefill: the decode instance its policy picks (cache-aware with prefix caching), the prompt tokens
that instance does not cache (the decode pool's PrefixIndex guess; the whole prompt without one),
the prompt tokens queued on the least-loaded prefill instance (the router's exact outstanding
counts), and the decode instance's slack (`decode_slack_tokens`). The router dispatches a local
prefill at once, with no KV handle and `GenerateRequest.local_prefill` set (the instance does not
count it as a recompute); `CountedPrefill` keeps its uncached tokens in the decode instance's
outstanding tokens until its first output, so the decisions right after it see them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from pdserve.config import Mode, RouterConfig
from pdserve.router.pd_decision import PDDecision, PDRule
from pdserve.router.pool import Instance, Pool
from pdserve.types import GenerateRequest, StepOutput, WorkerStats


def decode_slack_tokens(stats: WorkerStats, uncached_tokens: int) -> int:
    """Prompt tokens the decode instance can add to its next step: its token budget
    (`max_num_batched_tokens`) less one token per request it holds (running decodes; waiting ones
    too, conservatively) and the local-prefill tokens already on it (`outstanding_tokens`, the
    router's count). 0 when its limits are not known yet (no stats polled), when it has no free
    sequence slot, or when its free KV blocks cannot hold `uncached_tokens` + 1 plus the one block per
    running request that pull admission keeps in reserve (decode/scheduler.py)."""
    s = stats
    if s.max_num_batched_tokens <= 0 or s.block_size <= 0:
        return 0
    busy = s.num_running + s.num_waiting
    blocks = -(-(uncached_tokens + 1) // s.block_size) + s.num_running
    if busy >= s.max_num_seqs or blocks > s.num_free_blocks:
        return 0
    return max(0, s.max_num_batched_tokens - busy - s.outstanding_tokens)


class ConditionalDispatch:
    """The router's P/D decider: `decide` per request, and the count of decisions by (local|remote, reason)."""

    def __init__(self, rule: PDRule) -> None:
        self.rule = rule
        self.decisions: Counter[tuple[str, str]] = Counter()

    @classmethod
    def from_config(cls, cfg: RouterConfig, mode: Mode) -> ConditionalDispatch | None:
        """The decider the config asks for; None when it asks for none (colocated, or threshold 0 and
        no queue limit: every request goes to the prefill pool, today's path, with no decision)."""
        if mode != "disaggregated" or not cfg.conditional:
            return None
        return cls(PDRule(cfg.pd_threshold_tokens, cfg.pd_prefill_queue_limit))

    def decide(self, req: GenerateRequest, prefill: Pool[Any],
               decode: Pool[Any]) -> tuple[Instance[Any], PDDecision] | None:
        """The decode instance the decode policy chooses for `req` (not yet counted as a dispatch:
        the caller commits it if the prefill is local) and the decision; None with no healthy one."""
        chosen = decode.choose(req)
        if chosen is None:
            return None
        inst, hit_tokens = chosen
        n = len(req.prompt_token_ids)
        uncached = n - min(hit_tokens, n - 1)  # the engine computes at least the last prompt token
        slack = decode_slack_tokens(inst.snapshot(), uncached)
        healthy = prefill.healthy()
        if healthy:
            queued = min(i.snapshot().outstanding_tokens for i in healthy)
            decision = self.rule.decide(uncached, queued, slack)
        else:  # the decode instance computes the prompt anyway: an intended local prefill, not a recompute
            decision = PDDecision(True, "no_prefill", uncached, 0, slack)
        self.decisions["local" if decision.local else "remote", decision.reason] += 1
        return inst, decision


class CountedPrefill:
    """A local prefill's output stream, its `num_tokens` uncached prompt tokens counted in
    `inst.outstanding_tokens` from construction until its first output, its end, or `aclose`."""

    def __init__(self, inst: Instance[Any], num_tokens: int, stream: AsyncGenerator[StepOutput, None]) -> None:
        self._inst, self._n, self._stream = inst, num_tokens, stream
        inst.outstanding_tokens += num_tokens

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self

    async def __anext__(self) -> StepOutput:
        try:
            return await anext(self._stream)
        finally:
            self._settle()

    async def aclose(self) -> None:
        self._settle()
        await self._stream.aclose()

    def _settle(self) -> None:
        self._inst.outstanding_tokens -= self._n
        self._n = 0
