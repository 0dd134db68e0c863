"""Wire types shared by the router and both roles: what a request is, and what a step returns.

Pure dataclasses (no torch, no ray) so the router can build them and workers can receive them
through Ray's object store or any RPC. `SamplingParams` validates itself: a bad value raises
`ValueError` naming the field, which the router maps to HTTP 400.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NewType, TypeVar

if TYPE_CHECKING:
    from pdserve.kvtransfer.types import KVHandle

RequestId = NewType("RequestId", str)
FinishReason = Literal["stop", "length", "abort", "error"]
PullOutcome = Literal["ok", "failed", "timed_out"]  # how a decode instance's KV pull ended
SAMPLING_EPS = 1e-5  # temperatures below this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, with vLLM's names, defaults and accepted types: `stop` a
    string or a list of them, `stop_token_ids` a list, None for "not set" (`max_tokens=None`:
    until the context is full, resolved by whoever knows the model's length)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables top-k
    seed: int | None = None
    max_tokens: int | None = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Inputs are converted once, at construction (as attrs converters do), so the stored value
        # is always the hashable canonical form: str / list / None -> tuple.
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, ())
            elif isinstance(value, str) and name == "stop":
                object.__setattr__(self, name, (value,))
            elif isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        _check(isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf,
               "temperature", f"must be finite and >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
               "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
               "top_k", f"must be -1 (disabled) or >= 0, got {self.top_k!r}")
        _check(self.seed is None or isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
                                            and self.max_tokens >= 1),
               "max_tokens", f"must be an integer >= 1 or None, got {self.max_tokens!r}")
        _check(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
               "stop", f"must be a string or a list of non-empty strings, got {self.stop!r}")
        _check(len(self.stop) <= 16, "stop", "at most 16 stop strings")
        _check(isinstance(self.stop_token_ids, tuple) and all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", f"must be a list of non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        """Argmax. A temperature below `SAMPLING_EPS` counts as 0 (vLLM's rule): dividing logits by
        it overflows to inf and the softmax to NaN."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def replace(self, **changes: object) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _check(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {why}")


@dataclass(frozen=True)
class GenerateRequest:
    """Immutable request as the router hands it to a worker.

    `output_token_ids` is empty for a fresh request; a request re-dispatched after a worker died
    carries the tokens already streamed, so the new worker recomputes prompt + outputs and
    continues (it never re-emits them).
    """

    request_id: RequestId
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    output_token_ids: tuple[int, ...] = ()
    arrival_s: float = 0.0
    # Conditional disaggregation (router/conditional.py): the router chose to let this decode instance
    # prefill the prompt itself. Without it, a disaggregated decode instance given no KV handle is
    # recomputing after a failure (flagged `kv_recomputed`, counted).
    local_prefill: bool = False


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request: new tokens, their text, and whether it ended.

    `text` is the detokenized delta for `token_ids`, already cut at a stop string. `error` is set
    iff `finish_reason == "error"`; a worker reports one when the step that ran the request raised
    (the router retries such a request once, elsewhere if it can).
    """

    request_id: RequestId
    token_ids: tuple[int, ...]
    text: str = ""
    finish_reason: FinishReason | None = None
    error: str | None = None
    # This instance's part of the request's latency, on the request's first output from it; the
    # router's last output carries the whole request's (LatencyBreakdown.finalize).
    latency: LatencyBreakdown | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class LatencyBreakdown:
    """Where one request's time went, in seconds of the clock of whoever measured each part.

    Workers report their own part on the request's first output from each instance: prefill
    {prefill_queue_s, prefill_s}; decode after a pull {decode_queue_s (waiting for a sequence slot
    and KV memory), transfer_s, transfer_bytes, kv_pull, pull_skipped_tokens (a delta pull)}; decode computing the prompt itself
    (colocated, a local prefill the router chose, or a recompute after a failure: `kv_recomputed`)
    {prefill_queue_s, prefill_s}; whoever
    computes the prompt adds `cached_tokens`, its prefix-cache hit. The
    router adds the parts over roles and attempts (`+`) and fills the end-to-end figures with
    `finalize` on the last output. `decode_queue_s` / `transfer_bytes` / `kv_pull` are None when no
    pull was started / completed / attempted. `transfer_s` is the pull's whole duration (admitted to
    landed); `kv_exposed_s` the part of it after decode had the first token, i.e. not hidden behind
    the prefill forward by layer-wise streaming (without streaming: all of it); the phases count the
    exposed part, so they still sum to e2e_s. Plain floats, ints, bools and strings only: it
    crosses Ray's object store as is.
    """

    prefill_queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_queue_s: float | None = None
    transfer_s: float = 0.0
    transfer_bytes: int | None = None
    kv_pull: PullOutcome | None = None
    kv_recomputed: bool = False
    cached_tokens: int = 0  # prompt tokens the computing instance found in its prefix cache (not computed)
    pull_skipped_tokens: int = 0  # prompt tokens a pull did not move: decode's prefix cache held them
    decode_s: float = 0.0  # finalize: e2e less queues, prefill and transfer
    ttft_s: float = 0.0  # finalize: arrival to first token (router clock)
    e2e_s: float = 0.0  # finalize: arrival to last output (router clock)
    kv_exposed_s: float | None = None  # decode: the pull's time after the first token was there
    # The router's conditional-disaggregation decision (router/pd_decision.py), None when it made none:
    # prefilled on the decode instance (True) or on the prefill pool (False), why, and its inputs (tokens).
    pd_local: bool | None = None
    pd_reason: str = ""
    pd_uncached_tokens: int = 0
    pd_prefill_queue_tokens: int = 0
    pd_decode_slack_tokens: int = 0

    @property
    def queue_s(self) -> float:
        """All queueing, both roles: with prefill_s, exposed_transfer_s and decode_s it sums to e2e_s."""
        return self.prefill_queue_s + (self.decode_queue_s or 0.0)

    @property
    def exposed_transfer_s(self) -> float:
        """The transfer's share of the critical path (all of `transfer_s` unless it overlapped prefill)."""
        return self.transfer_s if self.kv_exposed_s is None else self.kv_exposed_s

    def phases(self) -> dict[str, float]:
        """The four phases end-to-end time splits into (they sum to e2e_s once finalized), seconds."""
        return {"queue": self.queue_s, "prefill": self.prefill_s, "transfer": self.exposed_transfer_s,
                "decode": self.decode_s}

    def __add__(self, other: LatencyBreakdown) -> LatencyBreakdown:
        """Both parts (two roles, or two attempts): times and bytes add; the later pull outcome wins."""
        return LatencyBreakdown(
            self.prefill_queue_s + other.prefill_queue_s, self.prefill_s + other.prefill_s,
            _add_opt(self.decode_queue_s, other.decode_queue_s), self.transfer_s + other.transfer_s,
            _add_opt(self.transfer_bytes, other.transfer_bytes), other.kv_pull or self.kv_pull,
            self.kv_recomputed or other.kv_recomputed, max(self.cached_tokens, other.cached_tokens),
            self.pull_skipped_tokens + other.pull_skipped_tokens, self.decode_s + other.decode_s,
            self.ttft_s + other.ttft_s, self.e2e_s + other.e2e_s, _add_opt(self.kv_exposed_s, other.kv_exposed_s),
            *(other if other.pd_local is not None else self)._decision())

    def _decision(self) -> tuple[bool | None, str, int, int, int]:
        return (self.pd_local, self.pd_reason, self.pd_uncached_tokens, self.pd_prefill_queue_tokens,
                self.pd_decode_slack_tokens)

    def finalize(self, ttft_s: float, e2e_s: float) -> LatencyBreakdown:
        """The whole request's breakdown: decode_s is what the other parts leave of e2e_s (>= 0)."""
        decode = max(0.0, e2e_s - self.queue_s - self.prefill_s - self.exposed_transfer_s)
        return dataclasses.replace(self, decode_s=decode, ttft_s=ttft_s, e2e_s=e2e_s)

    def to_json(self) -> dict[str, float | str]:
        """The `pdserve_timings` object of the HTTP API: seconds by key (queue_s is all queueing,
        decode_queue_s its decode share), plus transfer_bytes and kv_recomputed (1.0) when they apply,
        and the P/D decision when one was made (pd_local 1.0 / 0.0, pd_reason a string, its inputs)."""
        out: dict[str, float | str] = {"queue_s": self.queue_s, "prefill_s": self.prefill_s,
                                       "transfer_s": self.transfer_s, "decode_s": self.decode_s,
                                       "ttft_s": self.ttft_s, "e2e_s": self.e2e_s}
        if self.decode_queue_s is not None:
            out["decode_queue_s"] = self.decode_queue_s
        if self.transfer_bytes is not None:
            out["transfer_bytes"] = float(self.transfer_bytes)
        if self.kv_exposed_s is not None:
            out["kv_exposed_s"] = self.kv_exposed_s
        if self.kv_recomputed:
            out["kv_recomputed"] = 1.0
        if self.cached_tokens:
            out["cached_tokens"] = float(self.cached_tokens)
        if self.pull_skipped_tokens:
            out["pull_skipped_tokens"] = float(self.pull_skipped_tokens)
        if self.pd_local is not None:
            out |= {"pd_local": float(self.pd_local), "pd_reason": self.pd_reason,
                    "pd_uncached_tokens": float(self.pd_uncached_tokens),
                    "pd_prefill_queue_tokens": float(self.pd_prefill_queue_tokens),
                    "pd_decode_slack_tokens": float(self.pd_decode_slack_tokens)}
        return out


_N = TypeVar("_N", int, float)


def _add_opt(a: _N | None, b: _N | None) -> _N | None:
    return a if b is None else b if a is None else a + b


@dataclass(frozen=True)
class StepRecord:
    """One engine step as it ran in serving: the input of an in-situ latency profile.

    Per chunk of the batch, `new_tokens` were computed on top of `cached_tokens` already in the
    KV cache (a fresh prompt: cached 0; a decode: new 1); the planner reads the step's shape from
    them (pdserve/placement/steps.py). `duration_s` is the forward plus sampling,
    what the placement latency model predicts; `start_s` is wall-clock time (time.time()), so steps
    of different instances line up with each other and with a benchmark's request records.
    """

    start_s: float
    duration_s: float
    new_tokens: tuple[int, ...]
    cached_tokens: tuple[int, ...]

    def to_json(self) -> dict:
        return {"start_s": self.start_s, "duration_s": self.duration_s,
                "new": list(self.new_tokens), "cached": list(self.cached_tokens)}

    @classmethod
    def from_json(cls, d: dict) -> StepRecord:
        return cls(float(d["start_s"]), float(d["duration_s"]), tuple(d["new"]), tuple(d["cached"]))


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill instance returns: the first token, and where its KV now waits to be pulled.

    `handle` is None when the request already finished at its first token (nothing to decode),
    or when prefill failed (then `first.finish_reason == "error"`).
    """

    first: StepOutput
    handle: KVHandle | None


@dataclass(frozen=True)
class WorkerStats:
    """A snapshot of one instance, which the router's dispatch policies read."""

    worker_id: str
    num_running: int = 0
    num_waiting: int = 0  # queued for prefill, or waiting for KV / blocks on decode
    num_free_blocks: int = 0
    num_total_blocks: int = 1
    outstanding_tokens: int = 0  # prompt tokens queued or running (prefill's policy input)
    expected_hit_tokens: int = 0  # tokens of the request being dispatched the router believes cached here
    healthy: bool = True
    # Engine time as the serving path sees it (cumulative since start): busy_s / num_steps is the
    # mean step time inside the actor, the figure to hold a latency profile against.
    busy_s: float = 0.0
    num_steps: int = 0
    num_step_tokens: int = 0
    # Decode only, cumulative: KV pulls by outcome ("ok", "failed", "timed_out", "recomputed") and
    # the bytes the completed ones received.
    kv_pulls: dict[str, int] = field(default_factory=dict)
    kv_pull_nbytes: int = 0
    num_failed_steps: int = 0  # steps that raised: their requests failed, the instance lives on
    # Prefix cache, cumulative (vLLM's prefix_cache_queries / prefix_cache_hits): prompt tokens looked
    # up, and those found cached (not computed, or not pulled on a decode instance).
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    num_fallback_steps: int = 0  # engine steps that ran without the native CPU kernels (engine/runner.py)
    # Decode only, the scheduling limits a local prefill must fit in (router/conditional.py); 0: unknown.
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    block_size: int = 0

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)
