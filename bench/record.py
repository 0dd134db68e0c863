"""What the client measured for one request, and the latencies derived from it.

All times are seconds measured at the client with a monotonic clock. Latency starts when the
request is sent. Without a client concurrency limit (the default, open loop) that is its
scheduled arrival; with one, the wait for a slot is the benchmark's, not the server's, and is
kept apart in `send_delay_s` (vLLM's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    index: int  # position in the workload
    prompt_len: int
    output_len: int  # requested (max_tokens)
    arrival_s: float  # scheduled offset from the start of the run
    ok: bool = False
    error: str | None = None
    send_delay_s: float = 0.0
    ttft_s: float | None = None  # sent -> first token
    e2e_s: float | None = None  # sent -> end of the stream
    num_output_tokens: int = 0  # the server's usage count when it sends one, else token chunks seen
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive token chunks
    server_timings: dict[str, float] = field(default_factory=dict)  # a server's own breakdown, if sent
    num_prompt_tokens: int | None = None  # the server's usage.prompt_tokens (chat template included), if sent

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1). A request with a single output token has no
        decode phase: its TPOT is undefined (None), it is left out of TPOT statistics and it
        meets any TPOT SLO. None as well for failed requests."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)

    @property
    def short(self) -> bool:
        """Completed with fewer tokens than requested (a server that ignored `ignore_eos`)."""
        return self.ok and self.num_output_tokens < self.output_len
