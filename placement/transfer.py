"""KV-transfer time: bytes ÷ (codec ratio × link bandwidth) + a fixed per-transfer overhead."""

from __future__ import annotations

from dataclasses import dataclass

# Wire bytes of a bf16/fp16 KV cache divided by the codec's bytes (scales included), from
# kvtransfer's codec ladder: int8/fp8 halve it, grouped int4 ≈ 3.6×, int4 + zstd ≈ 4.5×.
CODEC_RATIO = {"raw": 1.0, "int8": 1.94, "fp8": 2.0, "int4": 3.6, "int4_zstd": 4.7}


@dataclass(frozen=True, kw_only=True)
class TransferModel:
    kv_bytes_per_token: float
    bytes_per_s: float  # link bandwidth, bytes/s
    codec: str = "raw"
    overhead_s: float = 1e-3

    def __post_init__(self) -> None:
        if self.codec not in CODEC_RATIO:
            raise ValueError(f"kvtransfer.codec: must be one of {sorted(CODEC_RATIO)}, got {self.codec!r}")
        if not self.bytes_per_s > 0:
            raise ValueError(f"transfer bandwidth must be > 0, got {self.bytes_per_s}")

    @property
    def seconds_per_token(self) -> float:
        return self.kv_bytes_per_token / (CODEC_RATIO[self.codec] * self.bytes_per_s)

    def transfer_s(self, num_tokens: int) -> float:
        return self.overhead_s + num_tokens * self.seconds_per_token


NO_TRANSFER = TransferModel(kv_bytes_per_token=0.0, bytes_per_s=1.0, overhead_s=0.0)
