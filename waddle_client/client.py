"""``WaddleClient``: one channel of Waddle realtime over aiohttp's WebSocket client.

One background task owns the connection: it connects (``Authorization:
Bearer`` header), waits for ``initial_state``, reads frames until the socket
closes, then either stops (``client.close()``, close code 1000 or 1008, a
401/403 refusal) or reconnects after a full-jitter exponential backoff. A
second task per connection writes: first a ``sync`` when one is wanted,
then the remembered presence, then every message not yet written on this
connection. Messages stay in the outbox, keyed by their ``clientMsgId``,
until the server acknowledges them, so a reconnect resends exactly the
unacknowledged ones with the same id and the server deduplicates.

Incoming messages pass through the ``Sequencer`` (exactly once, in order);
everything the application sees is a typed event, fanned out to
``events()`` iterators and to callbacks registered with ``on()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random as _random
import time
import types
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from waddle_client.backoff import Backoff, full_jitter_delay
from waddle_client.errors import ClientClosedError, QueueFullError, SendError
from waddle_client.events import (
    Ack,
    ConnectionState,
    ErrorEvent,
    Event,
    InitialState,
    Message,
    OnlineUser,
    Presence,
    State,
    SyncComplete,
    Typing,
    UserConnected,
    UserDisconnected,
)
from waddle_client.sequencer import Outcome, Sequencer

__all__ = ["PRESENCE_STATUSES", "EventStream", "WaddleClient", "channel_socket_url"]

log = logging.getLogger("waddle_client")

E = TypeVar("E", bound=Event)

PRESENCE_STATUSES: Final = frozenset({"online", "away", "dnd"})

CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008

# Upgrade refusals that retrying cannot fix: invalid channel id, bad or
# expired token (a token_provider gets its chance before every reconnect,
# so a 401 after it is final), no right to join.
TERMINAL_STATUSES: Final = frozenset({400, 401, 403})

# Error codes after which a message is resent (with the same clientMsgId)
# rather than failed: the server marks `unavailable` retryable; `not_joined`
# means the publish raced the connection's registration with the channel
# owner, so the message was not stored and resending it is safe.
# `rate_limited` is retryable too and also slows this client's writes down.
RESEND_CODES: Final = frozenset({"unavailable", "not_joined", "rate_limited"})

TokenSource = Callable[[], Awaitable[str] | str]
UrlSource = Callable[[], Awaitable[str] | str]
Callback = Callable[[Any], Awaitable[None] | None]


def channel_socket_url(base: str, channel_id: str) -> str:
    """The WebSocket URL of ``channel_id`` on the edge at ``base`` (http(s) or ws(s))."""
    parts = urlsplit(base)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    scheme = schemes.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"not an http(s):// or ws(s):// URL: {base!r}")
    path = f"{parts.path.rstrip('/')}/channel/{quote(channel_id, safe='')}/websocket"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


async def _resolve(source: Callable[[], Awaitable[str] | str]) -> str:
    value = source()
    if inspect.isawaitable(value):
        value = await value
    if not isinstance(value, str) or not value:
        raise TypeError("provider must return a non-empty string")
    return value


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved (nobody may await it)."""
    if not future.cancelled():
        future.exception()


def _dumps(frame: Mapping[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


@dataclass(eq=False, slots=True)
class _Outgoing:
    """One message from ``send`` until its ack (or final failure).

    Queued: ``sent_on`` None and not ``waiting``: the writer will write it.
    In flight: ``sent_on`` is the connection it was written on; ``timer``
    resends it if no answer comes within ``ack_timeout``. Waiting: a
    retryable error arrived; ``timer`` queues it again after a backoff.
    """

    client_msg_id: str
    content: str
    thread_id: str | None
    frame: str
    future: asyncio.Future[Ack]
    sent_on: int | None = None
    gap_epoch: int = 0  # the pacing in force when it was last written
    waiting: bool = False
    retries: int = 0
    timer: asyncio.TimerHandle | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


@dataclass(slots=True)
class _Ended:
    """How one connection attempt ended."""

    reason: str
    close_code: int | None = None
    http_status: int | None = None
    terminal: bool = False
    opened_for: float | None = None


_END: Final = object()


class EventStream:
    """An async iterator over a client's events, from its creation on.

    Returned by ``WaddleClient.events()``. It ends after the client's
    terminal ``ConnectionState(closed)`` event. ``aclose()`` (or leaving an
    ``async with`` block) unsubscribes early.
    """

    def __init__(self, client: WaddleClient, backlog: Sequence[Event]) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._client: WaddleClient | None = client
        for event in backlog:
            self._queue.put_nowait(event)

    def _put(self, item: object) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._client is None and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._detach()
            raise StopAsyncIteration
        assert isinstance(item, Event)
        return item

    def _detach(self) -> None:
        if self._client is not None:
            self._client._streams.discard(self)
            self._client = None

    async def aclose(self) -> None:
        self._detach()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._detach()


class WaddleClient:
    """A connection to one Waddle channel that survives network drops.

    ``url`` is the edge's base URL (``http(s)://`` or ``ws(s)://``, with an
    optional path prefix) or a list of them: each reconnect attempt moves on
    to the next, so a client can leave an edge that died. ``url_provider``
    (sync or async callable returning a base URL) overrides the list.

    ``token`` is the JWT for the first connection; ``token_provider`` (sync
    or async callable) is called before every later attempt — and before
    the first when ``token`` is None — to get a fresh one.

    Backoff: ``delay = random() * min(backoff_cap, backoff_base * 2**attempt)``;
    the attempt counter goes back to 0 after a connection stayed open
    ``stable_after`` seconds (measured with ``clock``).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        channel_id: str,
        token: str | None = None,
        *,
        token_provider: TokenSource | None = None,
        url_provider: UrlSource | None = None,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        stable_after: float = 10.0,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.monotonic,
        max_queue: int = 1000,
        max_in_flight: int = 8,
        ack_timeout: float = 30.0,
        max_frame_bytes: int = 32768,
        heartbeat: float | None = 30.0,
        open_timeout: float = 15.0,
        max_gap_syncs: int = 3,
        event_backlog: int = 10_000,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if not channel_id:
            raise ValueError("channel_id is required")
        if token is None and token_provider is None:
            raise ValueError("give a token or a token_provider")
        bases = [url] if isinstance(url, str) else list(url)
        if not bases and url_provider is None:
            raise ValueError("give at least one url (or a url_provider)")
        for base in bases:
            channel_socket_url(base, channel_id)  # validate early
        if max_queue < 1 or max_in_flight < 1:
            raise ValueError("max_queue and max_in_flight must be >= 1")
        self.channel_id = channel_id
        self._bases = bases
        self._url_index = -1
        self._url_provider = url_provider
        self._token = token
        self._token_provider = token_provider
        self._random = random
        self._clock = clock
        self._backoff = Backoff(
            base=backoff_base, cap=backoff_cap, stable_after=stable_after, random=random
        )
        self._max_queue = max_queue
        self._max_in_flight = max_in_flight
        self._ack_timeout = ack_timeout
        self._gap = 0.0  # seconds between message writes, learnt from rate limits
        self._gap_epoch = 0  # bumped whenever _gap changes
        self._next_write_at = 0.0  # loop time
        self._max_frame_bytes = max_frame_bytes
        self._heartbeat = heartbeat
        self._open_timeout = open_timeout
        self._session = session
        self._owns_session = session is None

        self._state = State.CLOSED
        self._started = False
        self._finished = False
        self._closed_event = asyncio.Event()
        self._terminal: ClientClosedError | None = None
        self._opened: asyncio.Future[None] | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None  # open connection
        self._socket: aiohttp.ClientWebSocketResponse | None = None  # any, for close()
        self._conn_no = 0
        self._aborted = 0  # a connection this client ended itself (not the server)
        self._attempted = False
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()

        self._pending: dict[str, _Outgoing] = {}
        self._seq = Sequencer(max_gap_syncs=max_gap_syncs)
        self._sync_wanted = False
        self._sync_retries = 0
        self._sync_timer: asyncio.TimerHandle | None = None
        self._presence: str | None = None
        self._presence_wanted = False
        self._online: dict[str, OnlineUser] = {}

        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._backlog: deque[Event] | None = deque(maxlen=event_backlog)
        self._callbacks: list[tuple[type[Event], Callback]] = []
        self._dispatch_queue: asyncio.Queue[object] | None = None
        self._dispatch_task: asyncio.Task[None] | None = None

    # -- properties -----------------------------------------------------------

    @property
    def state(self) -> State:
        """The connection state (``closed`` also before ``connect()``)."""
        return self._state

    @property
    def closed_reason(self) -> ClientClosedError | None:
        """Why the client reached its terminal state, once it has."""
        return self._terminal

    @property
    def online_users(self) -> Mapping[str, OnlineUser]:
        """Members online in the channel by user id, as the server last reported."""
        return types.MappingProxyType(dict(self._online))

    @property
    def last_seq(self) -> int | None:
        """The highest seq handed to the application, ``None`` before the first connection."""
        return self._seq.last

    @property
    def pending(self) -> tuple[str, ...]:
        """``clientMsgId``s of the messages awaiting their ack, oldest first."""
        return tuple(self._pending)

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> WaddleClient:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Start the connection and wait until it is open.

        Transient failures are retried in the background while this waits
        (bound it with ``asyncio.timeout``); raises ``ClientClosedError``
        when the client reaches its terminal state first (401/403 refusal,
        close code 1008 or 1000, ``close()``).
        """
        if self._terminal is not None:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        if not self._started:
            self._started = True
            self._opened = loop.create_future()
            self._opened.add_done_callback(_consume)
            self._set_state(State.CONNECTING)
            self._run_task = loop.create_task(self._run(), name=f"waddle:{self.channel_id}")
        assert self._opened is not None
        await asyncio.shield(self._opened)

    async def close(self) -> None:
        """Close for good: no reconnect; unacknowledged sends fail with ``ClientClosedError``."""
        if self._terminal is None:
            self._terminal = ClientClosedError("closed by the application")
        task = self._run_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._finish()

    async def wait_closed(self) -> ClientClosedError:
        """Wait until the client reached its terminal state; return why.

        When this returns, the connection loop has ended: nothing reconnects.
        """
        await self._closed_event.wait()
        task = self._run_task
        current = asyncio.current_task()
        if task is not None and current not in (task, self._dispatch_task):
            await asyncio.gather(asyncio.shield(task), return_exceptions=True)
        return self._closed_error()

    async def flush(self) -> None:
        """Wait until every message pending now is acknowledged or has failed."""
        futures = [p.future for p in self._pending.values()]
        if futures:
            await asyncio.wait(futures)

    # -- sending ----------------------------------------------------------------

    async def send(self, content: str, thread_id: str | None = None) -> Ack:
        """Send a chat message and wait for its ``ack`` (it is then durable).

        Queued while disconnected and resent after reconnects until acked.
        Raises ``SendError`` when the server refuses it for good,
        ``QueueFullError`` when too many messages await their ack, and
        ``ClientClosedError`` when the client closes first. Cancelling the
        wait does not withdraw the message.
        """
        out = self._enqueue(content, thread_id)
        return await asyncio.shield(out.future)

    def send_nowait(self, content: str, thread_id: str | None = None) -> str:
        """Queue a chat message and return its ``clientMsgId`` at once.

        The outcome arrives as an ``Ack`` event (or an ``ErrorEvent`` with
        this ``client_msg_id``); ``flush()`` waits for all of them.
        """
        return self._enqueue(content, thread_id).client_msg_id

    def _enqueue(self, content: str, thread_id: str | None) -> _Outgoing:
        if self._terminal is not None:
            raise self._closed_error()
        if not isinstance(content, str):
            raise TypeError("content must be a string")
        if thread_id is not None and not isinstance(thread_id, str):
            raise TypeError("thread_id must be a string or None")
        if len(self._pending) >= self._max_queue:
            raise QueueFullError(self._max_queue)
        client_msg_id = str(uuid.uuid4())
        body: dict[str, Any] = {"type": "message", "content": content, "clientMsgId": client_msg_id}
        if thread_id is not None:
            body["threadId"] = thread_id
        frame = _dumps(body)
        if len(frame.encode()) > self._max_frame_bytes:
            raise SendError(
                "frame_too_big",
                f"the message frame is over {self._max_frame_bytes} bytes",
                client_msg_id,
            )
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        out = _Outgoing(client_msg_id, content, thread_id, frame, future)
        self._pending[client_msg_id] = out
        self._wake.set()
        return out

    async def set_typing(self, is_typing: bool) -> bool:
        """Tell the channel whether the user is typing.

        Not queued (a stale typing state is worse than none): returns False
        and sends nothing while disconnected.
        """
        return await self._send_now({"type": "typing", "isTyping": bool(is_typing)})

    async def set_presence(self, status: str) -> bool:
        """Set the user's status (``online``, ``away``, ``dnd``).

        Remembered and announced again after every reconnect. Returns
        whether it was sent now.
        """
        if status not in PRESENCE_STATUSES:
            raise ValueError(f"status must be one of {sorted(PRESENCE_STATUSES)}")
        self._presence = status
        self._presence_wanted = False
        return await self._send_now({"type": "presence", "status": status})

    async def _send_now(self, frame: Mapping[str, Any]) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            await self._write(ws, _dumps(frame))
        except (aiohttp.ClientError, OSError, RuntimeError):
            return False
        return True

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        async with self._write_lock:
            await ws.send_str(text)

    # -- events -------------------------------------------------------------------

    def events(self) -> EventStream:
        """An async iterator over events from now on; ends when the client closes.

        The first stream also receives the events emitted before any stream
        existed (up to ``event_backlog`` of them), so ``async with client:
        async for event in client.events()`` misses nothing.
        """
        backlog: Sequence[Event] = ()
        if self._backlog is not None:
            backlog = list(self._backlog)
            self._backlog = None
        stream = EventStream(self, backlog)
        if self._finished:
            stream._put(_END)
        else:
            self._streams.add(stream)
        return stream

    def on(
        self, event_type: type[E], callback: Callable[[E], Awaitable[None] | None]
    ) -> Callable[[], None]:
        """Call ``callback`` for every event of ``event_type`` (``Event`` for all).

        Callbacks run in order on one task of the client, after the event;
        a coroutine callback is awaited before the next event is dispatched.
        An exception in a callback is logged and reported as an
        ``ErrorEvent(code="callback")``. Returns a function that unsubscribes.
        """
        entry: tuple[type[Event], Callback] = (event_type, callback)
        self._callbacks.append(entry)

        def off() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(entry)

        return off

    def _emit(self, event: Event) -> None:
        for stream in list(self._streams):
            stream._put(event)
        if self._backlog is not None:
            self._backlog.append(event)
        if self._callbacks:
            if self._dispatch_queue is None:
                self._dispatch_queue = asyncio.Queue()
            self._dispatch_queue.put_nowait(event)
            if self._dispatch_task is None or self._dispatch_task.done():
                self._dispatch_task = asyncio.get_running_loop().create_task(
                    self._dispatch(self._dispatch_queue), name="waddle:callbacks"
                )

    async def _dispatch(self, queue: asyncio.Queue[object]) -> None:
        while True:
            event = await queue.get()
            if event is _END:
                return
            assert isinstance(event, Event)
            for event_type, callback in list(self._callbacks):
                if not isinstance(event, event_type):
                    continue
                try:
                    result = callback(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    log.exception("event callback failed")
                    if not isinstance(event, ErrorEvent) or event.code != "callback":
                        self._emit(ErrorEvent("callback", f"{type(exc).__name__}: {exc}"))

    def _set_state(self, state: State, **detail: Any) -> None:
        self._state = state
        self._emit(ConnectionState(state, **detail))

    # -- the connection loop ----------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                try:
                    ended = await self._connect_once()
                except Exception as exc:  # a bug must not end the connection loop
                    log.exception("connection failed", extra={"channel_id": self.channel_id})
                    ended = _Ended(reason=f"internal error: {type(exc).__name__}: {exc}")
                if ended.terminal:
                    self._terminal = ClientClosedError(
                        ended.reason, close_code=ended.close_code, http_status=ended.http_status
                    )
                    await self._finish()
                    return
                if ended.opened_for is not None:
                    self._backoff.connection_lasted(ended.opened_for)
                attempt, delay = self._backoff.next_delay()
                log.info(
                    "reconnecting",
                    extra={"channel_id": self.channel_id, "attempt": attempt, "delay": delay},
                )
                self._set_state(
                    State.RECONNECTING,
                    reason=ended.reason,
                    close_code=ended.close_code,
                    http_status=ended.http_status,
                    attempt=attempt,
                    delay=delay,
                )
                await asyncio.sleep(delay)
        finally:
            await self._drop_connection()

    async def _next_url(self) -> str:
        if self._url_provider is not None:
            base = await _resolve(self._url_provider)
        else:
            self._url_index = (self._url_index + 1) % len(self._bases)
            base = self._bases[self._url_index]
        return channel_socket_url(base, self.channel_id)

    async def _next_token(self) -> str:
        if self._token_provider is not None and (self._attempted or self._token is None):
            return await _resolve(self._token_provider)
        assert self._token is not None
        return self._token

    async def _connect_once(self) -> _Ended:
        reconnect = self._seq.last is not None
        try:
            url = await self._next_url()
        except Exception as exc:
            self._emit(ErrorEvent("url_provider", f"{type(exc).__name__}: {exc}"))
            return _Ended(reason=f"url provider failed: {exc}")
        try:
            token = await self._next_token()
        except Exception as exc:
            self._emit(ErrorEvent("token_provider", f"{type(exc).__name__}: {exc}"))
            return _Ended(reason=f"token provider failed: {exc}")
        finally:
            self._attempted = True
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self._open_timeout):
                ws = await self._session.ws_connect(
                    url,
                    headers={"Authorization": f"Bearer {token}"},
                    heartbeat=self._heartbeat,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                )
        except aiohttp.WSServerHandshakeError as exc:
            reason = f"HTTP {exc.status}: {exc.message}"
            terminal = exc.status in TERMINAL_STATUSES
            return _Ended(reason=reason, http_status=exc.status, terminal=terminal)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return _Ended(reason=f"{type(exc).__name__}: {exc}".rstrip(": "))
        self._socket = ws
        self._conn_no += 1
        try:
            return await self._serve(ws, self._conn_no, url, reconnect)
        finally:
            await self._drop_connection()

    async def _serve(
        self, ws: aiohttp.ClientWebSocketResponse, conn_no: int, url: str, reconnect: bool
    ) -> _Ended:
        opened_at: float | None = None
        reason = "connection lost"
        try:
            async with asyncio.timeout(self._open_timeout):
                first = await ws.receive()
            if first.type is aiohttp.WSMsgType.TEXT:
                frame = self._parse(first.data)
                if frame is None or frame.get("type") != "initial_state":
                    self._emit(ErrorEvent("bad_frame", "the first frame was not initial_state"))
                    await ws.close()
                    return _Ended(reason="no initial_state")
                opened_at = self._clock()
                self._open(ws, conn_no, frame, url, reconnect)
                while True:
                    msg = await ws.receive()
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        frame = self._parse(msg.data)
                        if frame is not None:
                            self._handle(frame)
                    elif msg.type is aiohttp.WSMsgType.BINARY:
                        self._emit(ErrorEvent("bad_frame", "binary frame from the server"))
                    else:
                        first = msg
                        break
            if first.type is aiohttp.WSMsgType.CLOSE and isinstance(first.extra, str):
                reason = first.extra or reason
            elif first.type is aiohttp.WSMsgType.ERROR:
                reason = f"{type(first.data).__name__}: {first.data}"
        except TimeoutError:
            reason = "timed out waiting for initial_state"
        code = None if ws.close_code is None else int(ws.close_code)
        opened_for = None if opened_at is None else self._clock() - opened_at
        if code in (CLOSE_POLICY, CLOSE_NORMAL) and self._aborted != conn_no:
            return _Ended(reason=reason, close_code=code, terminal=True, opened_for=opened_for)
        return _Ended(reason=reason, close_code=code, opened_for=opened_for)

    def _open(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        conn_no: int,
        frame: Mapping[str, Any],
        url: str,
        reconnect: bool,
    ) -> None:
        state = InitialState.from_wire(frame, reconnect=reconnect)
        self._online = {u.user_id: u for u in state.online_users}
        self._emit(state)
        self._seq.connection_lost()
        outcome = self._seq.on_initial_state(state, reconnect=reconnect)
        self._sync_wanted = False
        self._sync_retries = 0
        self._apply(outcome)
        self._presence_wanted = self._presence is not None and self._presence != "online"
        for out in self._pending.values():
            # Everything unacknowledged goes out again, in order, same ids.
            out.cancel_timer()
            out.sent_on = None
            out.waiting = False
        self._ws = ws
        self._writer_task = asyncio.get_running_loop().create_task(
            self._writer(ws, conn_no), name="waddle:writer"
        )
        self._wake.set()
        self._set_state(State.OPEN, url=url)
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(None)

    async def _drop_connection(self) -> None:
        """Forget the current socket (closing it if still open) and its writer."""
        self._ws = None
        writer, self._writer_task = self._writer_task, None
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        self._seq.connection_lost()
        ws, self._socket = self._socket, None
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await ws.close(code=CLOSE_NORMAL, message=b"client closed")

    async def _writer(self, ws: aiohttp.ClientWebSocketResponse, conn_no: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._ws is ws:
                await self._wake.wait()
                self._wake.clear()
                if self._sync_wanted and not self._seq.sync_outstanding:
                    self._sync_wanted = False
                    after = self._seq.sync_started()
                    await self._write(ws, _dumps({"type": "sync", "afterSeq": after}))
                if self._presence_wanted and self._presence is not None:
                    self._presence_wanted = False
                    await self._write(ws, _dumps({"type": "presence", "status": self._presence}))
                while self._ws is ws:
                    # The oldest message not on the wire; while it waits for a
                    # retry the later ones wait too, so one sender's messages
                    # keep their order and are not refused in a row.
                    out = next(
                        (o for o in self._pending.values() if o.sent_on is None or o.waiting),
                        None,
                    )
                    if out is None or out.waiting:
                        break
                    in_flight = sum(
                        1 for o in self._pending.values() if o.sent_on == conn_no and not o.waiting
                    )
                    # Once rate limited, one message at a time: a burst already
                    # on the wire would be refused frame after frame.
                    window = 1 if self._gap > 0 else self._max_in_flight
                    if in_flight >= window:
                        break  # an ack or error wakes the writer
                    delay = self._next_write_at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)  # pacing after a rate limit
                        continue
                    out.sent_on = conn_no
                    out.gap_epoch = self._gap_epoch
                    out.timer = loop.call_later(self._ack_timeout, self._ack_overdue, out, conn_no)
                    self._next_write_at = loop.time() + self._gap
                    await self._write(ws, out.frame)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            # The reader sees the socket close and reconnects; what was not
            # acknowledged is written again on the next connection.
            log.info("write failed", extra={"channel_id": self.channel_id, "error": str(exc)})
        except Exception:
            log.exception("writer failed", extra={"channel_id": self.channel_id})
            self._aborted = conn_no  # end this connection and reconnect
            await ws.close(code=CLOSE_NORMAL, message=b"client error")

    def _ack_overdue(self, out: _Outgoing, conn_no: int) -> None:
        """No ack nor error within ``ack_timeout``: write it again (same id)."""
        out.timer = None
        if self._pending.get(out.client_msg_id) is out and out.sent_on == conn_no:
            log.info(
                "ack overdue, resending",
                extra={"channel_id": self.channel_id, "client_msg_id": out.client_msg_id},
            )
            out.sent_on = None
            self._wake.set()

    # -- incoming frames ----------------------------------------------------------

    def _parse(self, data: Any) -> dict[str, Any] | None:
        try:
            frame = json.loads(data)
        except (TypeError, ValueError):
            self._emit(ErrorEvent("bad_frame", "unreadable frame from the server"))
            return None
        if not isinstance(frame, dict):
            self._emit(ErrorEvent("bad_frame", "frame from the server is not an object"))
            return None
        return frame

    def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message":
            body = frame.get("message")
            if isinstance(body, Mapping):
                self._apply(self._seq.offer(Message.from_wire(body)))
        elif kind == "ack":
            self._on_ack(Ack.from_wire(frame))
        elif kind == "error":
            self._on_error(ErrorEvent.from_wire(frame))
        elif kind == "sync_complete":
            event = SyncComplete.from_wire(frame)
            self._sync_retries = 0
            outcome = self._seq.on_sync_complete()
            self._apply(outcome)
            self._emit(event)
        elif kind == "typing":
            self._emit(Typing.from_wire(frame))
        elif kind == "presence":
            presence = Presence.from_wire(frame)
            known = self._online.get(presence.user_id)
            self._online[presence.user_id] = OnlineUser(
                user_id=presence.user_id,
                username=presence.username,
                status=presence.status,
                joined_at=known.joined_at if known is not None else None,
            )
            self._emit(presence)
        elif kind == "user_connected":
            connected = UserConnected.from_wire(frame)
            if connected.user_id not in self._online:
                self._online[connected.user_id] = OnlineUser(
                    connected.user_id, connected.username, joined_at=int(time.time() * 1000)
                )
            self._emit(connected)
        elif kind == "user_disconnected":
            gone = UserDisconnected.from_wire(frame)
            self._online.pop(gone.user_id, None)
            self._emit(gone)
        # `pong`, a repeated `initial_state` and unknown types are ignored
        # (forward compatibility).

    def _apply(self, outcome: Outcome) -> None:
        if outcome.history_reset:
            self._emit(ErrorEvent("history_reset", "the channel's history was reset on the server"))
        for message in outcome.deliver:
            self._emit(message)
        if outcome.gap_skipped is not None:
            first, last = outcome.gap_skipped
            self._emit(ErrorEvent("gap_skipped", f"messages {first} to {last} could not be read"))
        if outcome.want_sync and not self._seq.sync_outstanding:
            self._sync_wanted = True
            self._wake.set()

    def _on_ack(self, ack: Ack) -> None:
        out = self._pending.pop(ack.client_msg_id, None)
        if out is None:
            return  # the ack of a resend whose original was acknowledged already
        out.cancel_timer()
        self._wake.set()  # room in the in-flight window
        if not out.future.done():
            out.future.set_result(ack)
        self._emit(ack)

    def _on_error(self, error: ErrorEvent) -> None:
        cmid = error.client_msg_id
        out = self._pending.get(cmid) if cmid is not None else None
        if error.code == "rate_limited" and out is not None:
            self._slow_down(error.retry_after, paced=out.gap_epoch == self._gap_epoch)
        if out is not None:
            self._wake.set()  # room in the in-flight window
            if error.retryable or error.code in RESEND_CODES:
                self._schedule_resend(out, error.retry_after)
            else:
                del self._pending[out.client_msg_id]
                out.cancel_timer()
                if not out.future.done():
                    out.future.set_exception(SendError(error.code, error.message, cmid))
        elif error.code == "sync_in_progress" and self._seq.sync_outstanding:
            # The edge is filling a gap of its own; ask again shortly.
            self._seq.sync_refused()
            delay = full_jitter_delay(
                self._sync_retries,
                self._random(),
                base=self._backoff.base,
                cap=self._backoff.cap,
            )
            self._sync_retries += 1
            if self._sync_timer is not None:
                self._sync_timer.cancel()
            self._sync_timer = asyncio.get_running_loop().call_later(delay, self._want_sync)
        self._emit(error)

    def _want_sync(self) -> None:
        self._sync_timer = None
        if self._ws is not None and not self._seq.sync_outstanding:
            self._sync_wanted = True
            self._wake.set()

    def _slow_down(self, retry_after: float | None, *, paced: bool) -> None:
        """The server refused a message for its rate: pace writes from now on.

        ``retryAfterMs`` is the time until the server's bucket holds one
        token again, at most the interval of its sustained rate, so the
        writes are spaced by the largest wait seen (plus a margin); when a
        message written at the current spacing is still refused (``paced``),
        the spacing grows by half. No message goes out before the wait is
        over, and from the first refusal on only one is on the wire at a time.
        """
        wait = retry_after if retry_after is not None else self._backoff.base
        wait = min(max(wait, 0.001), self._backoff.cap)
        gap = max(self._gap, wait * 1.1)
        if paced and self._gap > 0:
            gap = max(gap, self._gap * 1.5)
        gap = min(gap, self._backoff.cap)
        if gap != self._gap:
            self._gap = gap
            self._gap_epoch += 1
        loop_now = asyncio.get_running_loop().time()
        self._next_write_at = max(self._next_write_at, loop_now + wait)

    def _schedule_resend(self, out: _Outgoing, retry_after: float | None) -> None:
        delay = full_jitter_delay(
            out.retries, self._random(), base=self._backoff.base, cap=self._backoff.cap
        )
        if retry_after is not None:
            delay = max(delay, retry_after)
        out.retries += 1
        out.cancel_timer()
        out.waiting = True

        def due() -> None:
            out.timer = None
            if self._pending.get(out.client_msg_id) is out and out.waiting:
                out.waiting = False
                out.sent_on = None
                self._wake.set()

        out.timer = asyncio.get_running_loop().call_later(delay, due)

    # -- the end ------------------------------------------------------------------------

    def _closed_error(self) -> ClientClosedError:
        t = self._terminal
        assert t is not None
        return ClientClosedError(t.reason, close_code=t.close_code, http_status=t.http_status)

    async def _finish(self) -> None:
        """Enter the terminal state (once): fail what is pending, end the streams."""
        if self._terminal is None:
            self._terminal = ClientClosedError("closed by the application")
        if not self._finished:
            self._finished = True
            self._started = True
            for out in list(self._pending.values()):
                out.cancel_timer()
                if not out.future.done():
                    out.future.set_exception(self._closed_error())
            self._pending.clear()
            if self._opened is not None and not self._opened.done():
                self._opened.set_exception(self._closed_error())
            t = self._terminal
            self._set_state(
                State.CLOSED, reason=t.reason, close_code=t.close_code, http_status=t.http_status
            )
            for stream in list(self._streams):
                stream._put(_END)
            self._streams.clear()
            if self._dispatch_queue is not None:
                self._dispatch_queue.put_nowait(_END)
            self._closed_event.set()
        dispatcher = self._dispatch_task
        if dispatcher is not None and dispatcher is not asyncio.current_task():
            with contextlib.suppress(Exception):
                await dispatcher
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()
