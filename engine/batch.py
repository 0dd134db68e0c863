"""What one `Engine.step()` runs: a list of chunks, each a run of one request's uncomputed tokens."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.request import Request


@dataclass(frozen=True)
class Chunk:
    """Run `num_tokens` of `request` starting at its `num_computed_tokens`.

    A chunk that reaches the end of the request's tokens samples the next token; a shorter one
    (a chunked-prefill piece) only fills the cache.
    """

    request: Request
    num_tokens: int

    @property
    def samples(self) -> bool:
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass(frozen=True)
class Batch:
    chunks: tuple[Chunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)
