"""decode/agreed_receiver.py: the ranks of a TP decode instance agree on each pull, and the bytes a
completed pull reports are every rank's share (what `pdserve_kv_transfer_bytes_total` and the
request's `transfer_bytes` count), not rank 0's alone."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.decode.agreed_receiver import AgreedReceiver
from pdserve.kvtransfer.types import KVHandle, TransferId, TransferStatus


class _RankReceiver:
    """One rank's KVReceiver: its share of each pull is `share` bytes; `land()` ends the pulls."""

    def __init__(self, share: int) -> None:
        self.share = share
        self.status: dict[TransferId, TransferStatus] = {}
        self.aborted: list[TransferId] = []

    def pull(self, handle: KVHandle, dst_block_ids: Sequence[int], first_token: int = 0) -> TransferId:
        xfer = TransferId(f"x{len(self.status)}")
        self.status[xfer] = TransferStatus.PENDING
        return xfer

    def land(self, status: TransferStatus = TransferStatus.DONE) -> None:
        for x in self.status:
            self.status[x] = status

    def poll(self, xfer: TransferId) -> tuple[TransferStatus, str | None]:
        s = self.status[xfer]
        return s, "checksum mismatch" if s is TransferStatus.FAILED else None

    def nbytes(self, xfer: TransferId) -> int:
        return self.share if self.status[xfer] is TransferStatus.DONE else self.share // 2

    def abort(self, xfer: TransferId) -> None:
        self.aborted.append(xfer)


def _ranks(*shares: int) -> tuple[list[_RankReceiver], list[AgreedReceiver]]:
    local = [_RankReceiver(s) for s in shares]
    return local, [AgreedReceiver(r) for r in local]  # type: ignore[arg-type]


def _step(agreed: list[AgreedReceiver]) -> None:
    reports = [a.local_report() for a in agreed]  # what LockStep all-gathers once per step
    for a in agreed:
        a.agree(reports)


def _pull(agreed: list[AgreedReceiver]) -> list[int]:
    handle = KVHandle.__new__(KVHandle)  # opaque to the fake receivers
    return [a.pull(handle, [0, 1]) for a in agreed]


def test_a_done_pull_counts_every_ranks_bytes() -> None:
    local, agreed = _ranks(1000, 1200, 800)
    keys = _pull(agreed)
    local[0].land()
    _step(agreed)  # rank 0 is done, the others are not: nothing decided yet
    assert [a.poll(k) for a, k in zip(agreed, keys)] == [(TransferStatus.PENDING, None)] * 3
    for r in local[1:]:
        r.land()
    _step(agreed)
    assert [a.poll(k)[0] for a, k in zip(agreed, keys)] == [TransferStatus.DONE] * 3
    assert [a.nbytes(k) for a, k in zip(agreed, keys)] == [3000] * 3


def test_a_failed_rank_fails_the_pull_everywhere_and_counts_nothing() -> None:
    local, agreed = _ranks(1000, 1000)
    keys = _pull(agreed)
    local[1].land(TransferStatus.FAILED)
    _step(agreed)
    assert [a.poll(k) for a, k in zip(agreed, keys)] == [(TransferStatus.FAILED, "checksum mismatch")] * 2
    assert [a.nbytes(k) for a, k in zip(agreed, keys)] == [0, 0]
    assert local[0].aborted  # the rank whose share was still moving gave it up
