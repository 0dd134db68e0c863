"""Engine-side state of one request: its tokens, its blocks, how far the cache has caught up, where
its KV comes from, and its latency on this instance. Schedulers own the request's life (queues,
status, finish); the engine only runs it.

Interval map over `all_token_ids` (prompt + outputs):

    [0, num_computed_tokens)            KV in this engine's blocks (computed here or pulled)
    [num_computed_tokens, num_tokens)   still to run through the model

The last output token is always uncomputed while the request runs: it is the next step's input.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pdserve.types import FinishReason, LatencyBreakdown, RequestId, SamplingParams, StepOutput


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; no blocks yet (or a partly prefilled prompt waiting for its next chunk)
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"  # decode: KV on a prefill instance; pulling once blocks are given
    RUNNING = "running"
    FINISHED = "finished"  # ended for the client: `finish_reason` says why; blocks freed
    HANDED_OFF = "handed_off"  # prefill: first token out, KV exported for decode; this instance's part is over


@dataclass(eq=False)
class Request:
    request_id: RequestId
    prompt_token_ids: list[int]
    sampling: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival_s: float = 0.0
    num_prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks so far
    num_keyed_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    detokenizer: Any = None  # pdserve.tokenizer.IncrementalDetokenizer when the engine has a tokenizer
    kv_handle: Any = None  # kvtransfer KVHandle: decode pulls its KV from there; prefill: its export
    kv_transfer: Any = None  # decode: the receiver's transfer id while the pull runs
    # This instance's clock (seconds): when it entered the queue it is computed from (arrival here,
    # or the end of a failed pull), when it first ran after that, when its pull started.
    queued_s: float = 0.0
    scheduled_s: float | None = None
    pull_started_s: float | None = None
    first_token_s: float | None = None  # decode: when the prefill-sampled token was here (streamed handoff)
    latency: LatencyBreakdown = field(default_factory=LatencyBreakdown)  # this instance's part so far
    latency_reported: bool = False  # sent on an output already

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def first_latency(self, now: float) -> LatencyBreakdown | None:
        """This instance's latency part, once (None after): a request computed here adds its queue
        wait and compute time up to `now` (its first sampled token) to what its pull recorded."""
        if self.latency_reported:
            return None
        self.latency_reported = True
        if self.kv_pull_landed:
            return self.latency
        start = now if self.scheduled_s is None else self.scheduled_s
        return self.latency + LatencyBreakdown(prefill_queue_s=start - self.queued_s, prefill_s=now - start,
                                               cached_tokens=self.num_prefix_hit_tokens)

    @property
    def kv_pull_landed(self) -> bool:
        return self.latency.kv_pull == "ok"


def append_token(req: Request, token: int, eos_token_ids: frozenset[int], max_model_len: int) -> StepOutput:
    """Append a sampled token and apply the stop conditions (stop string, stop token, EOS unless
    ignored, max_tokens, the context length). Returns the output for it; when it ends the request,
    `finish_reason` is set and the status is FINISHED (freeing its blocks is the scheduler's)."""
    req.output_token_ids.append(token)
    text, hit_stop = req.detokenizer.add([token]) if req.detokenizer is not None else ("", False)
    reason: FinishReason | None = None
    sp = req.sampling
    if hit_stop or token in sp.stop_token_ids or (not sp.ignore_eos and token in eos_token_ids):
        reason = "stop"
    elif len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= max_model_len:
        reason = "length"
    if reason is not None:
        if req.detokenizer is not None and not hit_stop:
            text += req.detokenizer.flush()  # text held back for a stop string that never came
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
    return StepOutput(req.request_id, (token,), text, reason)
