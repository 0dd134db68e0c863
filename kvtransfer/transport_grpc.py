"""`GrpcTransport`: pull over a gRPC server-streaming call; works across any network, TLS optional.

Each sender runs a `KVData` server; `send` parks chunks in its outbox and the receiver's
`Pull(xfer)` streams them, one wire chunk (<= 4 MiB) per message. Cancelling either side cancels
the call; a sender-side failure ends the call with ABORTED and its message, so a cut stream is
never mistaken for a complete one.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import grpc

from pdserve.kvtransfer import kvtransfer_pb2 as pb
from pdserve.kvtransfer import kvtransfer_pb2_grpc as pb_grpc
from pdserve.kvtransfer.at_exit import close_at_exit, forget
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.outbox import Outbox, stream
from pdserve.kvtransfer.protocols import ChunkSink
from pdserve.kvtransfer.pull_transport import PullTransport
from pdserve.kvtransfer.rpc import Channels, RpcServer, TLSFiles, start_server
from pdserve.kvtransfer.transfer import TransferState, failed
from pdserve.kvtransfer.types import TransferId, TransferStatus

_WAIT_FOR_SEND_S = 10.0  # how long a pull waits for the matching send to be parked
_CLOSE_S = 5.0  # how long close() waits for the server and the pull threads to stop


class _DataService(pb_grpc.KVDataServicer):
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def Pull(self, request: pb.PullData, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        wait_s = context.time_remaining() or _WAIT_FOR_SEND_S
        parked = self.outbox.take(TransferId(request.xfer_id), min(wait_s, _WAIT_FOR_SEND_S))
        if parked is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no transfer {request.xfer_id} here")
        context.add_callback(lambda: parked.state.fail("receiver went away mid-transfer")
                             if not parked.state.status().terminal and not context.is_active() else None)
        try:
            for c in stream(parked):
                yield pb.Chunk(data=bytes(c))
        except Exception:  # the source failed; stream() recorded why on the send's state
            pass
        if parked.state.status() is TransferStatus.FAILED:
            context.abort(grpc.StatusCode.ABORTED, parked.state.error or "sender failed")


class GrpcTransport(PullTransport):
    name = "grpc"

    def __init__(self, listen: Listen, tls: TLSFiles | None = None, serve: bool = True) -> None:
        """`serve=False` for a receive-only end (decode workers need no server). Opens nothing."""
        super().__init__()
        self.listen, self.tls, self.serve = listen, tls, serve
        self._channels = Channels(tls)
        self._server: RpcServer | None = None
        self._endpoint = ""
        self._exit_token: int | None = None

    def start(self) -> GrpcTransport:
        """Serve the KVData service on `listen` (when `serve`). Idempotent; returns self."""
        if self._exit_token is None:
            if self.serve:
                self._server, self._endpoint = start_server(self.listen, self.tls, [
                    (pb_grpc.add_KVDataServicer_to_server, _DataService(self._outbox))])
            self._exit_token = close_at_exit(self, GrpcTransport.close)
        return self

    def endpoint(self) -> str:
        return self._endpoint

    def send(self, xfer: TransferId, chunks: Iterable[bytes | memoryview], peer: str,
             timeout_s: float) -> TransferState:
        if self._server is None:
            return failed(xfer, "this grpc transport does not serve (serve=False, or not started)")
        return self._outbox.put(xfer, chunks, timeout_s)

    def _pull(self, state: TransferState, peer: str, sink: ChunkSink, timeout_s: float) -> None:
        stub = pb_grpc.KVDataStub(self._channels.get(peer))
        # the call outlives the transfer's own deadline a little, so a send that never comes is the
        # armed timer's "timed out" (as on loopback), not a race with gRPC's DEADLINE_EXCEEDED
        call = stub.Pull(pb.PullData(xfer_id=state.xfer), timeout=timeout_s + 0.25)
        state.on_end(call.cancel)  # abort / timeout / close unblock the iteration below
        try:
            for msg in call:
                state.start()
                state.nbytes += len(msg.data)
                sink(memoryview(msg.data))
        except grpc.RpcError as e:
            state.fail(f"grpc {e.code().name}: {e.details()}")
        except Exception as e:  # the sink rejected a chunk (e.g. checksum mismatch)
            state.fail(f"{type(e).__name__}: {e}")
        state.finish()

    def close(self) -> None:
        pulls = self._close_receives()  # each call is cancelled: its pull thread leaves the stream
        if pulls is None:
            return
        if self._server is not None:
            self._server.stop(grace=None).wait(_CLOSE_S)
        for t in pulls:
            if t.ident is not None:  # not yet started: it starts on a failed state and leaves at once
                t.join(_CLOSE_S)
        self._channels.close()
        if self._exit_token is not None:
            forget(self._exit_token)
