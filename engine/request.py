"""Engine-side state of one request: its tokens, its blocks, and how far the cache has caught up.

Interval map over `all_token_ids` (prompt + outputs):

    [0, num_computed_tokens)            KV in this engine's blocks (computed here or pulled)
    [num_computed_tokens, num_tokens)   still to run through the model

The last output token is always uncomputed while the request runs: it is the next step's input.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pdserve.types import FinishReason, RequestId, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; no blocks yet
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"  # decode: blocks allocated, KV being pulled
    RUNNING = "running"
    FINISHED = "finished"


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
    detokenizer: Any = None  # pdserve.tokenizer.IncrementalDetokenizer when the engine has a tokenizer

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
