"""`Feeder`: runs a send's chunk source on its own thread, at most `DEPTH` chunks ahead of the
torch transport's pair thread (gather, encode, frame and crc overlap the gloo sends)."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

from pdserve.kvtransfer.torch_link import ABORT, CHUNK, DEPTH, END, POLL_S
from pdserve.kvtransfer.transfer import TransferState


class SourceError(Exception):
    """The chunk source raised `cause` (as opposed to gloo failing, which kills the pair)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Feeder:
    def __init__(self, chunks: Iterable[object], name: str) -> None:
        self._chunks = chunks
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(DEPTH)
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name=name).start()

    def _run(self) -> None:
        try:
            for c in self._chunks:
                if not self._put((CHUNK, c)):
                    return
            self._put((END, None))
        except BaseException as e:  # noqa: BLE001 - any failure of the source fails the transfer
            self._put((ABORT, e))

    def _put(self, item: tuple[int, object]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def chunks(self, state: TransferState, peer_closed: Callable[[], bool]) -> Iterator[object]:
        """Items in order until the source ends or `state` turns terminal; the source's exception
        comes out as `SourceError`. While the source keeps it waiting it watches `peer_closed`."""
        while not state.status().terminal:
            try:
                kind, item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if peer_closed():
                    state.fail("torch transport: the receiver closed")
                continue
            if kind == END:
                return
            if kind == ABORT:
                raise SourceError(item)  # type: ignore[arg-type]
            yield item

    def stop(self) -> None:
        """Let the feeder thread end (at its next chunk, if the source is blocked)."""
        self._stop.set()
