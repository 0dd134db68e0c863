"""`CodecController`: picks the cheapest codec that keeps the transfer off the critical path.

CacheGen's rule, decided per transfer before encoding: walk the ladder from lossless to most
compressed and take the first codec whose predicted wire time fits the budget. The budget is the
time the prefill took to produce the KV (with layer-wise streaming the transfer overlaps it), or
`default_budget_s` when the handle carries none. Link bandwidth starts at the configured hint and
follows an EWMA of measured transfers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdserve.kvtransfer.codecs import LADDER, get_codec
from pdserve.kvtransfer.types import KVHandle

if TYPE_CHECKING:
    from pdserve.engine.kv_cache import KVLayout

_EWMA = 0.25
_ZSTD_RATIO_VS_INT4 = 1.34  # int4_zstd's size is data-dependent; measured on SmolLM2 (BENCHMARKS.md, KV transfer)


class CodecController:
    def __init__(self, link_gbps: float | None = None, default_budget_s: float = 0.05,
                 ladder: tuple[str, ...] = LADDER, fixed: str | None = None) -> None:
        """`link_gbps` in gigaBYTES/s of payload (a hint; None = assume 1 GB/s until measured)."""
        self.bandwidth_Bps = (link_gbps or 1.0) * 1e9
        self.default_budget_s, self.ladder, self.fixed = default_budget_s, ladder, fixed

    def observe(self, nbytes: int, seconds: float) -> None:
        """Fold one finished transfer's achieved bytes/s into the bandwidth estimate."""
        if seconds > 0 and nbytes > 0:
            self.bandwidth_Bps = (1 - _EWMA) * self.bandwidth_Bps + _EWMA * nbytes / seconds

    def wire_nbytes(self, codec: str, handle: KVHandle, layout: KVLayout) -> float:
        shape = (2, handle.num_tokens, layout.num_kv_heads, handle.head_dim)
        c = get_codec(codec)
        n = c.wire_nbytes(shape, layout.torch_dtype)
        if n is None:  # data-dependent: predict from int4's formula and the measured extra gain
            n = get_codec("int4").wire_nbytes(shape, layout.torch_dtype) / _ZSTD_RATIO_VS_INT4
        return float(n) * layout.num_layers

    def choose(self, handle: KVHandle, layout: KVLayout) -> str:
        if self.fixed is not None:
            return self.fixed
        budget = handle.prefill_s if handle.prefill_s else self.default_budget_s
        for name in self.ladder:
            if self.wire_nbytes(name, handle, layout) / self.bandwidth_Bps <= budget:
                return name
        return self.ladder[-1]
