"""AgreedReceiver: a decode rank's KV receiver whose pull outcomes all ranks of the instance agree on.

Each rank pulls its own (layers × kv heads) of a request's KV with its own KVReceiver, so a pull
completes at a different moment on each rank. `AgreedReceiver` hides the local outcome from
DecodeWorker until the ranks agree: DONE once every rank is DONE; FAILED as soon as any rank
failed (the others abort theirs), so every rank recomputes. Transfers are named by a sequence
number, identical across ranks because every rank starts the same pulls in the same order. With
one rank the agreement is that rank's own outcome, decided at the step that saw it land.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.types import KVHandle, TransferId, TransferStatus

Outcome = tuple[TransferStatus, "str | None"]


class AgreedReceiver:
    """What DecodeWorker uses as its receiver on a rank; also the rank's `Agreement` on pulls."""

    def __init__(self, receiver: KVReceiver) -> None:
        self.receiver = receiver
        self._xfers: dict[int, TransferId] = {}  # undecided pulls: key -> this rank's transfer
        self._decided: dict[int, Outcome] = {}
        self._nbytes: dict[int, int] = {}  # of decided DONE pulls: every rank's share, summed
        self._ended: dict[int, float] = {}  # of decided DONE pulls, when one rank is the whole instance
        self._seq = 0

    def pull(self, handle: KVHandle, dst_block_ids: Sequence[int], first_token: int = 0) -> int:
        self._seq += 1
        self._xfers[self._seq] = self.receiver.pull(handle, dst_block_ids, first_token)
        return self._seq

    def poll(self, key: int) -> Outcome:
        return self._decided.pop(key, (TransferStatus.PENDING, None))

    def nbytes(self, key: int) -> int:
        return self._nbytes.pop(key, 0)

    def ended_s(self, key: int) -> float | None:
        """time.monotonic() when the pull ended, with one rank; None with several (each rank's pull
        lands at its own moment, on its own node's clock; the outcome is agreed at a step)."""
        return self._ended.pop(key, None)

    def abort(self, key: int) -> None:
        self._decided.pop(key, None)
        self._nbytes.pop(key, None)
        self._ended.pop(key, None)
        xfer = self._xfers.pop(key, None)
        if xfer is not None:
            self.receiver.abort(xfer)

    def close(self) -> None:
        self.receiver.close()

    def local_report(self) -> dict[int, tuple[TransferStatus, str | None, int]]:
        """Per ended pull: this rank's outcome and the bytes its share received."""
        out = {k: (*self.receiver.poll(x), self.receiver.nbytes(x)) for k, x in self._xfers.items()}
        return {k: o for k, o in out.items() if o[0].terminal}

    def agree(self, reports: list[dict[int, tuple[TransferStatus, str | None, int]]]) -> None:
        for key in sorted(self._xfers):  # the same keys on every rank: pulls and aborts are replayed
            seen = [r.get(key) for r in reports]
            failed = [o for o in seen if o is not None and o[0] is TransferStatus.FAILED]
            if failed:
                self.receiver.abort(self._xfers.pop(key))  # no-op where it already ended
                self._decided[key] = (TransferStatus.FAILED, failed[0][1])
            elif all(o is not None for o in seen):
                xfer = self._xfers.pop(key)
                self._nbytes[key] = sum(o[2] for o in seen if o is not None)  # the whole KV: all ranks' shares
                self._decided[key] = (TransferStatus.DONE, None)
                ended = self.receiver.ended_s(xfer) if len(reports) == 1 else None
                if ended is not None:
                    self._ended[key] = ended
