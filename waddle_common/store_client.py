"""The store service as its callers see it: a typed async client with deadlines.

Used by the channel owner (load, append) and by the edge (replay, history,
read cursors). Every
call has a deadline; every transport failure becomes ``StoreUnavailable`` so
callers can answer "retry later" without knowing gRPC.

Group commits go over one long-lived ``AppendStream`` per client, one
request and its answer at a time, instead of a unary call each: on a
2-core machine a unary call costs the store about twice the CPU of a
message on an open stream. The stream is opened on first use and again
after it ends; a store without it (an older version during a rolling
upgrade) is sent unary ``AppendBatch`` calls instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from time import perf_counter
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from waddle_common import wire
from waddle_common.grpc_tls import GrpcTls, open_channel
from waddle_common.grpc_util import ClientMetricsInterceptor, channel_options, status_code
from waddle_common.settings import Settings
from waddle_pb import store_pb2, store_pb2_grpc

log = logging.getLogger("waddle.store_client")

# Codes after which the same request may succeed later.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


APPEND_STREAM = "/waddle.store.v1.StoreService/AppendStream"

CURSOR_BATCH = 10_000
"""Most cursors in one ``SetReadCursors`` call (the store's limit); larger
batches are sent as several calls."""


class StoreUnavailable(Exception):
    """The store could not answer now; the request may be retried."""


class UnknownMessageId(Exception):
    """``after_message_id`` names no message of that channel."""


def stored_to_body(m: store_pb2.StoredMessage) -> dict[str, Any]:
    return wire.message_body(
        id=m.id,
        seq=m.seq,
        channel_id=m.channel_id,
        user_id=m.user_id,
        username=m.username,
        avatar_url=m.avatar_url,
        content=m.content,
        timestamp_ms=m.timestamp_ms,
        thread_id=m.thread_id,
    )


class StoreClient:
    def __init__(
        self,
        address: str,
        *,
        timeout: float,
        options: list[tuple[str, Any]] | None = None,
        interceptors: list[grpc.aio.ClientInterceptor] | None = None,
        tls: GrpcTls | None = None,
        timing: ClientMetricsInterceptor | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = open_channel(
            address, tls or GrpcTls(), options=options or [], interceptors=interceptors
        )
        self._stub = store_pb2_grpc.StoreServiceStub(self._channel)
        self._timing = timing
        self._append_lock = asyncio.Lock()
        self._append_call: Any = None  # the open AppendStream call, if any
        self._append_unary = False  # the store has no AppendStream

    @classmethod
    def from_settings(
        cls, settings: Settings, *, registry: CollectorRegistry, tls: GrpcTls
    ) -> StoreClient:
        """The store client every service builds: configured address, deadline,
        shared channel options, per-method latency into ``registry``."""
        timing = ClientMetricsInterceptor(registry)
        return cls(
            settings.store_address,
            timeout=settings.store_timeout_seconds,
            options=channel_options(),
            interceptors=[timing],
            tls=tls,
            timing=timing,
        )

    async def close(self) -> None:
        self._drop_append_stream()
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _RETRYABLE:
                raise StoreUnavailable(f"{exc.code().name}: {exc.details()}") from exc
            raise

    async def load_channel(self, channel_id: str, recent_limit: int) -> store_pb2.ChannelState:
        req = store_pb2.LoadChannelRequest(channel_id=channel_id, recent_limit=recent_limit)
        result: store_pb2.ChannelState = await self._call(self._stub.LoadChannel, req)
        return result

    async def append_batch(
        self, req: store_pb2.AppendBatchRequest
    ) -> store_pb2.AppendBatchResponse:
        """One group commit, on the append stream (one request at a time).

        Fails as the unary ``AppendBatch`` would: ``StoreUnavailable`` when
        the request may be retried (the store is down, did not answer within
        the deadline, or the stream broke before the answer), and
        ``grpc.aio.AioRpcError`` when the store refused the request as such
        (``INVALID_ARGUMENT``). A refusal leaves the stream open; any other
        failure drops it and the next call opens a new one. After a store
        without the stream, unary calls are kept until this client closes.
        """
        if self._append_unary:
            result: store_pb2.AppendBatchResponse = await self._call(self._stub.AppendBatch, req)
            return result
        async with self._append_lock:
            started = perf_counter()
            code = "UNKNOWN"
            try:
                answer = await self._append_on_stream(req)
                if answer is None:  # the store has no AppendStream
                    code = "UNIMPLEMENTED"
                    return await self.append_batch(req)
                status = status_code(answer.code)
                code = status.name
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                raise
            except StoreUnavailable:
                code = "UNAVAILABLE"
                raise
            finally:
                if self._timing is not None:
                    self._timing.observe(APPEND_STREAM, code, perf_counter() - started)
        if status is grpc.StatusCode.OK:
            return answer.batch
        if status in _RETRYABLE:
            raise StoreUnavailable(f"{status.name}: {answer.details}")
        raise grpc.aio.AioRpcError(status, grpc.aio.Metadata(), grpc.aio.Metadata(), answer.details)

    async def _append_on_stream(
        self, req: store_pb2.AppendBatchRequest
    ) -> store_pb2.AppendStreamResponse | None:
        """Send ``req`` and read its answer; None when the store has no stream.

        A stream that was already open and ends without answering (the store
        restarted since the last round) is replaced once and the request
        sent again. If the first copy was committed after all, the second is
        fenced by the head it names, as any retried commit is.
        """
        while True:
            call = self._append_call
            fresh = call is None or call.done()
            if fresh:
                call = self._append_call = self._stub.AppendStream()
            try:
                async with asyncio.timeout(self.timeout):
                    await call.write(req)
                    answer = await call.read()
            except grpc.aio.AioRpcError as exc:
                self._drop_append_stream()
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("the store has no append stream; using unary calls")
                    self._append_unary = True
                    return None
                if exc.code() not in _RETRYABLE:
                    raise
                failure = f"{exc.code().name}: {exc.details()}"
            except TimeoutError as exc:
                self._drop_append_stream()
                raise StoreUnavailable(
                    f"DEADLINE_EXCEEDED: no answer on the append stream in {self.timeout}s"
                ) from exc
            except asyncio.InvalidStateError as exc:  # it ended between done() and write()
                self._drop_append_stream()
                failure = f"append stream ended: {exc}"
            except BaseException:  # cancelled: an answer may still come, never reuse it
                self._drop_append_stream()
                raise
            else:
                if answer is not grpc.aio.EOF:
                    result: store_pb2.AppendStreamResponse = answer
                    return result
                self._drop_append_stream()
                failure = "append stream ended before the answer"
            if fresh:
                raise StoreUnavailable(failure)

    def _drop_append_stream(self) -> None:
        call, self._append_call = self._append_call, None
        if call is not None:
            call.cancel()

    async def messages_after(
        self,
        channel_id: str,
        *,
        after_seq: int | None = None,
        after_message_id: str | None = None,
        limit: int = 500,
    ) -> store_pb2.MessagePage:
        req = store_pb2.MessagesAfterRequest(channel_id=channel_id, limit=limit)
        if after_message_id is not None:
            req.after_message_id = after_message_id
        else:
            req.after_seq = after_seq or 0
        try:
            result: store_pb2.MessagePage = await self._call(self._stub.MessagesAfter, req)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise UnknownMessageId(exc.details() or "") from exc
            raise
        return result

    async def history(
        self, channel_id: str, *, before_seq: int = 0, limit: int = 50, thread_id: str = ""
    ) -> store_pb2.MessagePage:
        """A page of the newest ``limit`` (1..100) messages before ``before_seq``
        (0: the newest), oldest first; of one thread when ``thread_id`` is set.

        Roots carry ``reply_count``; ``has_more`` says whether older messages
        exist. An unknown channel is an empty page. A malformed request
        (e.g. ``limit`` outside 1..100) raises ``grpc.aio.AioRpcError`` with
        ``INVALID_ARGUMENT``.
        """
        req = store_pb2.HistoryRequest(
            channel_id=channel_id, before_seq=before_seq, limit=limit, thread_id=thread_id
        )
        result: store_pb2.MessagePage = await self._call(self._stub.History, req)
        return result

    async def set_read_cursors(
        self, cursors: Sequence[tuple[str, str, int]]
    ) -> list[store_pb2.ReadCursor]:
        """Move each (user_id, channel_id, seq) cursor forward; never back.

        Returns the stored cursors in the same order: a stale write answers
        with the newer stored value, and a seq past the channel's head is
        stored as the head. Sent in calls of at most ``CURSOR_BATCH``
        cursors, each its own transaction (a call that fails raises, and
        the calls before it stay written). A malformed cursor raises
        ``grpc.aio.AioRpcError`` with ``INVALID_ARGUMENT``.
        """
        stored: list[store_pb2.ReadCursor] = []
        for start in range(0, len(cursors), CURSOR_BATCH):
            req = store_pb2.SetReadCursorsRequest(
                cursors=[
                    store_pb2.ReadCursor(user_id=user_id, channel_id=channel_id, seq=seq)
                    for user_id, channel_id, seq in cursors[start : start + CURSOR_BATCH]
                ]
            )
            result: store_pb2.SetReadCursorsResponse = await self._call(
                self._stub.SetReadCursors, req
            )
            stored.extend(result.cursors)
        return stored

    async def get_read_cursor(self, user_id: str, channel_id: str) -> int:
        """The user's read cursor in the channel (0: none)."""
        req = store_pb2.GetReadCursorRequest(user_id=user_id, channel_id=channel_id)
        result: store_pb2.ReadCursor = await self._call(self._stub.GetReadCursor, req)
        return result.seq

    async def get_read_cursors(
        self, keys: Sequence[tuple[str, str]], timeout: float | None = None
    ) -> list[int]:
        """Each (user_id, channel_id)'s read cursor (0: none), in order, in
        one call (at most ``CURSOR_BATCH`` keys)."""
        req = store_pb2.GetReadCursorsRequest(
            keys=[
                store_pb2.GetReadCursorRequest(user_id=user_id, channel_id=channel_id)
                for user_id, channel_id in keys
            ]
        )
        result: store_pb2.GetReadCursorsResponse = await self._call(
            self._stub.GetReadCursors, req, timeout
        )
        if len(result.cursors) != len(keys):
            raise StoreUnavailable(f"{len(result.cursors)} cursors for {len(keys)} keys")
        return [c.seq for c in result.cursors]
