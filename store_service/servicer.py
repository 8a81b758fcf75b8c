"""The gRPC face of the store: protobuf <-> repository values, errors -> status codes.

Deliberately thin. All database work is in ``repository.py`` (history
pages in ``history.py``, read cursors in ``cursors.py``); every
``StoreError`` becomes a gRPC status in ``_guard`` and nowhere else.
Appends go through the ``AppendCommitter`` so concurrent callers share
transactions. A channel shard sends them over one ``AppendStream`` (a
unary call per commit round costs the store about twice the CPU of a
message on a stream); a refusal on the stream is answered in-band with the
status code ``AppendBatch`` would have failed with, and the stream goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from time import perf_counter
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio

from store_service import repository as repo
from store_service.cursors import ReadCursor, ReadCursors
from store_service.history import HistoryReader
from waddle_pb import store_pb2, store_pb2_grpc

T = TypeVar("T")

MAX_UINT32 = 2**32 - 1

_STATUS: dict[type[repo.StoreError], grpc.StatusCode] = {
    repo.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    repo.NotFound: grpc.StatusCode.NOT_FOUND,
    repo.Conflict: grpc.StatusCode.ALREADY_EXISTS,
    # Retryable: nothing of the request was written.
    repo.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


APPEND_STREAM = "/waddle.store.v1.StoreService/AppendStream"

Observe = Callable[[str, str, float], None]
"""Records one handled request: (method, status code name, seconds)."""


def _status(exc: repo.StoreError) -> grpc.StatusCode:
    return next(
        (status for kind, status in _STATUS.items() if isinstance(exc, kind)),
        grpc.StatusCode.INTERNAL,
    )


async def _abort(context: Any, exc: repo.StoreError) -> NoReturn:
    await context.abort(_status(exc), str(exc))
    raise AssertionError("context.abort returned")  # pragma: no cover


async def _guard(context: Any, work: Awaitable[T]) -> T:
    try:
        return await work
    except repo.StoreError as exc:
        await _abort(context, exc)


# --- protobuf -> repository ---------------------------------------------------------


def _new_message(m: store_pb2.NewMessage) -> repo.NewMessage:
    return repo.NewMessage(
        id=m.id,
        user_id=m.user_id,
        username=m.username,
        avatar_url=m.avatar_url,
        content=m.content,
        thread_id=m.thread_id or None,
        timestamp_ms=m.timestamp_ms,
        client_msg_id=m.client_msg_id,
    )


def _channel_append(group: store_pb2.ChannelAppend) -> repo.ChannelAppend:
    return repo.ChannelAppend(
        channel_id=group.channel_id,
        expected_last_seq=group.expected_last_seq,
        messages=tuple(_new_message(m) for m in group.messages),
    )


# --- repository -> protobuf ---------------------------------------------------------


def _stored(m: repo.StoredMessage) -> store_pb2.StoredMessage:
    return store_pb2.StoredMessage(
        id=m.id,
        channel_id=m.channel_id,
        seq=m.seq,
        user_id=m.user_id,
        username=m.username,
        avatar_url=m.avatar_url,
        content=m.content,
        thread_id=m.thread_id or "",
        timestamp_ms=m.timestamp_ms,
        client_msg_id=m.client_msg_id,
        reply_count=min(m.reply_count, MAX_UINT32),
    )


def _cursor(c: ReadCursor) -> store_pb2.ReadCursor:
    return store_pb2.ReadCursor(user_id=c.user_id, channel_id=c.channel_id, seq=c.seq)


def _append_result(r: repo.ChannelAppendResult) -> store_pb2.ChannelAppendResult:
    status = (
        store_pb2.ChannelAppendResult.OK
        if r.status is repo.AppendStatus.OK
        else store_pb2.ChannelAppendResult.FENCED
    )
    return store_pb2.ChannelAppendResult(
        channel_id=r.channel_id,
        status=status,
        last_seq=r.last_seq,
        results=[
            store_pb2.AppendResult(
                id=a.id, seq=a.seq, timestamp_ms=a.timestamp_ms, duplicate=a.duplicate
            )
            for a in r.results
        ],
    )


def _page(page: repo.MessagePage) -> store_pb2.MessagePage:
    return store_pb2.MessagePage(
        messages=[_stored(m) for m in page.messages],
        last_seq=page.last_seq,
        has_more=page.has_more,
    )


def _user(u: repo.User) -> store_pb2.User:
    return store_pb2.User(id=u.id, username=u.username, avatar_url=u.avatar_url)


class StoreServicer(store_pb2_grpc.StoreServiceServicer):
    """``waddle.store.v1.StoreService`` over a ``Repository`` and its ``AppendCommitter``."""

    def __init__(
        self,
        repository: repo.Repository,
        committer: repo.AppendCommitter,
        *,
        observe: Observe | None = None,
    ) -> None:
        self._repository = repository
        self._committer = committer
        self._history = HistoryReader(repository)
        self._cursors = ReadCursors(repository)
        self._observe = observe
        self._closing = asyncio.Event()

    def close_streams(self) -> None:
        """Shutdown: end every ``AppendStream`` between two requests (one being
        worked on is answered first), so no stream holds the server's grace."""
        self._closing.set()

    async def AppendBatch(
        self, request: store_pb2.AppendBatchRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.AppendBatchResponse:
        return await _guard(context, self._append(request))

    async def _append(self, request: store_pb2.AppendBatchRequest) -> store_pb2.AppendBatchResponse:
        """One request through the committer (both RPCs); a ``StoreError`` is the caller's."""
        groups = [_channel_append(g) for g in request.channels]
        results = await self._committer.append(groups)
        return store_pb2.AppendBatchResponse(channels=[_append_result(r) for r in results])

    # grpc.aio also takes a coroutine that reads and writes through the
    # context, which the generated stub's iterator signature does not say.
    async def AppendStream(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[store_pb2.AppendBatchRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        closing = asyncio.ensure_future(self._closing.wait())
        read: asyncio.Future[Any] | None = None
        try:
            while True:
                read = asyncio.ensure_future(context.read())
                done, _ = await asyncio.wait((read, closing), return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    return  # shutting down: the stream ends with OK between requests
                request = read.result()
                if request is grpc.aio.EOF:
                    return
                await context.write(await self._answer(request))
        finally:
            # Cancelled (the caller went away) or closing: leave no read behind.
            closing.cancel()
            if read is not None and not read.cancel() and not read.cancelled():
                read.exception()  # retrieved: a dead stream's error is not "never retrieved"

    async def _answer(
        self, request: store_pb2.AppendBatchRequest
    ) -> store_pb2.AppendStreamResponse:
        started = perf_counter()
        code = grpc.StatusCode.OK
        try:
            answer = store_pb2.AppendStreamResponse(batch=await self._append(request))
        except repo.StoreError as exc:
            code = _status(exc)
            answer = store_pb2.AppendStreamResponse(code=code.value[0], details=str(exc))
        if self._observe is not None:
            self._observe(APPEND_STREAM, code.name, perf_counter() - started)
        return answer

    async def LoadChannel(
        self, request: store_pb2.LoadChannelRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.ChannelState:
        state = await _guard(
            context, self._repository.load_channel(request.channel_id, request.recent_limit)
        )
        return store_pb2.ChannelState(
            channel_id=state.channel_id,
            last_seq=state.last_seq,
            settings=store_pb2.ChannelSettings(
                channel_id=state.channel_id, max_connections=state.max_connections
            ),
            recent=[_stored(m) for m in state.recent],
        )

    async def MessagesAfter(
        self, request: store_pb2.MessagesAfterRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.MessagePage:
        after_id = (
            request.after_message_id if request.WhichOneof("after") == "after_message_id" else None
        )
        page = await _guard(
            context,
            self._repository.messages_after(
                request.channel_id,
                after_seq=request.after_seq,
                after_message_id=after_id,
                limit=request.limit,
            ),
        )
        return _page(page)

    async def RecentMessages(
        self, request: store_pb2.RecentMessagesRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.MessagePage:
        page = await _guard(
            context, self._repository.recent_messages(request.channel_id, request.limit)
        )
        return _page(page)

    async def UpsertUsers(
        self, request: store_pb2.UpsertUsersRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.UpsertUsersResponse:
        users = [repo.User(u.id, u.username, u.avatar_url) for u in request.users]
        count = await _guard(context, self._repository.upsert_users(users))
        return store_pb2.UpsertUsersResponse(count=count)

    async def GetUser(
        self, request: store_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.User:
        return _user(await _guard(context, self._repository.get_user(request.id)))

    async def UpdateChannelSettings(
        self, request: store_pb2.ChannelSettings, context: grpc.aio.ServicerContext
    ) -> store_pb2.ChannelSettings:
        settings = await _guard(
            context,
            self._repository.update_channel_settings(
                repo.ChannelSettings(request.channel_id, request.max_connections)
            ),
        )
        return store_pb2.ChannelSettings(
            channel_id=settings.channel_id, max_connections=settings.max_connections
        )

    async def History(
        self, request: store_pb2.HistoryRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.MessagePage:
        page = await _guard(
            context,
            self._history.page(
                request.channel_id,
                before_seq=request.before_seq,
                limit=request.limit,
                thread_id=request.thread_id,
            ),
        )
        return _page(page)

    async def SetReadCursors(
        self, request: store_pb2.SetReadCursorsRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.SetReadCursorsResponse:
        cursors = [ReadCursor(c.user_id, c.channel_id, c.seq) for c in request.cursors]
        stored = await _guard(context, self._cursors.set(cursors))
        return store_pb2.SetReadCursorsResponse(cursors=[_cursor(c) for c in stored])

    async def GetReadCursor(
        self, request: store_pb2.GetReadCursorRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.ReadCursor:
        seq = await _guard(context, self._cursors.get(request.user_id, request.channel_id))
        return store_pb2.ReadCursor(user_id=request.user_id, channel_id=request.channel_id, seq=seq)

    async def GetReadCursors(
        self, request: store_pb2.GetReadCursorsRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.GetReadCursorsResponse:
        keys = [(k.user_id, k.channel_id) for k in request.keys]
        seqs = await _guard(context, self._cursors.get_many(keys))
        return store_pb2.GetReadCursorsResponse(
            cursors=[
                store_pb2.ReadCursor(user_id=user, channel_id=channel, seq=seq)
                for (user, channel), seq in zip(keys, seqs, strict=True)
            ]
        )
