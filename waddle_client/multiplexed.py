"""``WaddleConnection``: client protocol v1.1, one socket for many channels.

    async with WaddleConnection(url, token_provider=renew) as conn:
        general = await conn.subscribe("general")
        await general.send("hello")
        async for event in general:
            ...

One background task owns the socket (``GET /websocket``, ``Authorization:
Bearer``, one token check for every channel) and reconnects it with
full-jitter backoff, as ``WaddleClient`` does (``socket_loop``). A writer
task per socket writes, channel by channel, the ``subscribe`` frames that
are due (with ``afterSeq`` = the last seq handed to the application, after
a reconnect), then each subscribed channel's ``sync``/``presence``/``read``
frames, then the messages of the shared ``Outbox`` whose channel is
subscribed. Incoming frames are routed by ``channelId`` to the channel's
``ChannelHandle``, whose ``ChannelState`` and ``Sequencer`` give exactly-once,
in-order delivery per channel. A subscription refused with a retryable code
(``channel_full``, ``user_limit``, ``unavailable``, ``rate_limited``) is asked
again after the server's ``retryAfterMs``; ``forbidden`` and
``too_many_subscriptions`` close the handle (``SubscribeError``).
Frames are paced under the server's per-socket frame budget, so re-subscribing
many channels at once after a reconnect is never taken for abuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as _random
import re
import time
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import aiohttp

from waddle_client.backoff import full_jitter_delay
from waddle_client.channel import PRESENCE_STATUSES, ChannelHandle, Subscription
from waddle_client.emitter import EventStream
from waddle_client.errors import ChannelClosedError, ClientClosedError, SubscribeError
from waddle_client.events import Ack, ConnectionState, ErrorEvent, Event, State
from waddle_client.outbox import Outbox, dumps
from waddle_client.socket_loop import (
    CLOSE_NORMAL,
    Ended,
    ReconnectingSocket,
    TokenSource,
    UrlSource,
    multiplexed_socket_url,
)

__all__ = ["FrameBudget", "WaddleConnection", "valid_channel_id"]

log = logging.getLogger("waddle_client")

E = TypeVar("E", bound=Event)

_CHANNEL_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")

# Subscribe refusals that pass: asked again after retryAfterMs.
SUBSCRIBE_RETRY_CODES: Final = frozenset(
    {"channel_full", "user_limit", "unavailable", "rate_limited"}
)
# Bookkeeping answers that change nothing for a subscription under way.
_IGNORED_WHILE_SUBSCRIBING: Final = frozenset({"already_subscribed", "not_subscribed"})


def valid_channel_id(channel_id: object) -> bool:
    """1-128 characters of ``A-Z a-z 0-9 _ . : -``, starting with a letter or digit."""
    return isinstance(channel_id, str) and _CHANNEL_ID.fullmatch(channel_id) is not None


class FrameBudget:
    """A token bucket under the server's per-socket budget for all frames."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("frame_rate must be > 0 and frame_burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._at: float | None = None

    def take(self, now: float) -> float:
        """Spend one token; return the seconds to wait before using it (0: at once)."""
        if self._at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class WaddleConnection(ReconnectingSocket):
    """One v1.1 connection to a Waddle edge carrying many channels.

    ``url``, ``token``, ``token_provider``, ``url_provider`` and the backoff,
    queue and timeout options are those of ``WaddleClient``; the queue
    (``max_queue``, ``max_in_flight``) is the socket's, shared by its
    channels. ``frame_rate``/``frame_burst`` pace every frame written, below
    the server's ``WADDLE_FRAME_RATE``/``WADDLE_FRAME_BURST`` (50/s, 100).
    """

    def __init__(
        self,
        url: str | Sequence[str],
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
        max_message_length: int = 4000,
        heartbeat: float | None = 30.0,
        open_timeout: float = 15.0,
        max_gap_syncs: int = 3,
        frame_rate: float = 40.0,
        frame_burst: float = 80.0,
        event_backlog: int = 10_000,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        super().__init__(
            url,
            token,
            token_provider=token_provider,
            url_provider=url_provider,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            stable_after=stable_after,
            random=random,
            clock=clock,
            heartbeat=heartbeat,
            open_timeout=open_timeout,
            event_backlog=event_backlog,
            session=session,
            name="waddle:multiplexed",
        )
        self._outbox = Outbox(
            wake=self._wake_writer,
            random=random,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            max_queue=max_queue,
            max_in_flight=max_in_flight,
            ack_timeout=ack_timeout,
            max_frame_bytes=max_frame_bytes,
            max_message_length=max_message_length,
        )
        FrameBudget(frame_rate, frame_burst)  # validate early
        self._frame_rate = frame_rate
        self._frame_burst = frame_burst
        self._frames = FrameBudget(frame_rate, frame_burst)
        self._max_gap_syncs = max_gap_syncs
        self._event_backlog = event_backlog
        self._channels: dict[str, ChannelHandle] = {}
        self._leaving: dict[str, list[asyncio.Future[None]]] = {}
        self._presence: str | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None  # the open socket
        self._writer_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def _socket_url(self, base: str) -> str:
        return multiplexed_socket_url(base)

    # -- properties -------------------------------------------------------------

    @property
    def channels(self) -> Mapping[str, ChannelHandle]:
        """The channels subscribed (or being subscribed), by id."""
        return types.MappingProxyType(dict(self._channels))

    @property
    def pending(self) -> tuple[str, ...]:
        """``clientMsgId``s of every channel's messages awaiting their ack, oldest first."""
        return tuple(self._outbox.pending)

    # -- events -------------------------------------------------------------------

    def events(self) -> EventStream:
        """Every event of every channel (each names its ``channel_id``) and the
        connection's own (``ConnectionState``, errors about no channel), from
        now on; the first iterator also gets the earlier ones. Ends when the
        connection closes."""
        return self._events.stream()

    def on(
        self, event_type: type[E], callback: Callable[[E], Awaitable[None] | None]
    ) -> Callable[[], None]:
        """Call ``callback`` for every event of ``event_type``, of any channel."""
        return self._events.on(event_type, callback)

    def _set_state(self, state: State, **detail: Any) -> None:
        """Every channel's events also carry the connection's state changes;
        the terminal one closes every channel."""
        self._state = state
        event = ConnectionState(state, **detail)
        self._emit(event)
        for handle in list(self._channels.values()):
            handle._events.emit(event)
        if state is State.CLOSED:
            for handle in list(self._channels.values()):
                handle._close(self._closed_error)
            self._channels.clear()

    # -- channels -----------------------------------------------------------------

    async def subscribe(self, channel_id: str) -> ChannelHandle:
        """Join ``channel_id`` on this connection and return its handle once
        its ``initial_state`` arrived (starting the connection if needed).

        Already subscribed: the same handle. Retryable refusals are asked
        again after the server's ``retryAfterMs`` meanwhile (bound the wait
        with ``asyncio.timeout``; a cancelled subscribe is withdrawn).
        Raises ``SubscribeError`` when refused for good (``forbidden``,
        ``too_many_subscriptions``) and ``ClientClosedError`` when the
        connection ends first.
        """
        if not valid_channel_id(channel_id):
            raise ValueError(f"not a valid channel id: {channel_id!r}")
        self._start()
        handle = self._channels.get(channel_id)
        if handle is None:
            handle = ChannelHandle(self, channel_id, event_backlog=self._event_backlog)
            self._channels[channel_id] = handle
            self._wake_writer()
        try:
            await handle._wait_first()
        except asyncio.CancelledError:
            if not handle._first.done() and handle._closed is None:
                task = asyncio.get_running_loop().create_task(self._unsubscribe(handle))
                self._background(task)
            raise
        return handle

    async def presence(self, status: str) -> None:
        """Set the user's status in every channel, and in those subscribed later."""
        if status not in PRESENCE_STATUSES:
            raise ValueError(f"status must be one of {sorted(PRESENCE_STATUSES)}")
        self._raise_if_closed()
        self._presence = status
        for handle in list(self._channels.values()):
            await handle.presence(status)

    async def flush(self) -> None:
        """Wait until every message pending now is acknowledged or has failed."""
        futures = self._outbox.futures()
        if futures:
            await asyncio.wait(futures)

    async def _unsubscribe(self, handle: ChannelHandle) -> None:
        if handle._closed is not None:
            return
        channel_id = handle.channel_id
        written = (
            self._ws is not None
            and handle.sub_conn == self._conn_no
            and handle.status in (Subscription.SUBSCRIBING, Subscription.LIVE)
        )
        if self._channels.get(channel_id) is handle:
            del self._channels[channel_id]
        handle._close(
            lambda: ChannelClosedError("unsubscribed", channel_id=channel_id), "unsubscribed"
        )
        if not written:
            return
        # Until the server's answer, frames for the channel belong to the old
        # subscription: they are dropped, not handed to a new one.
        left: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leaving.setdefault(channel_id, []).append(left)
        if await self._send_now({"type": "unsubscribe", "channelId": channel_id}):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._open_timeout):
                    await asyncio.shield(left)
        if not left.done():
            self._left(channel_id, left)

    def _left(self, channel_id: str, which: asyncio.Future[None] | None = None) -> None:
        """The server answered the oldest ``unsubscribe`` for ``channel_id``."""
        waiting = self._leaving.get(channel_id)
        if not waiting:
            return
        future = waiting.pop(0) if which is None else which
        if which is not None and which in waiting:
            waiting.remove(which)
        if not waiting:
            del self._leaving[channel_id]
        if not future.done():
            future.set_result(None)

    def _subscribe_refused(self, handle: ChannelHandle, error: ErrorEvent) -> None:
        code = error.code
        if code in _IGNORED_WHILE_SUBSCRIBING:
            handle._emit(error)
            return
        if code in SUBSCRIBE_RETRY_CODES or error.retryable:
            handle.status = Subscription.PENDING
            handle.sub_conn = None
            delay = full_jitter_delay(
                handle.sub_retries, self._random(), base=self._backoff.base, cap=self._backoff.cap
            )
            delay = max(delay, error.retry_after or 0.0)
            handle.sub_retries += 1
            handle.sub_timer = asyncio.get_running_loop().call_later(
                delay, self._subscribe_due, handle
            )
            handle._emit(error)
            return
        channel_id = handle.channel_id
        if self._channels.get(channel_id) is handle:
            del self._channels[channel_id]
        handle._emit(error)
        handle._close(lambda: SubscribeError(code, error.message, channel_id=channel_id), code)

    def _subscribe_due(self, handle: ChannelHandle) -> None:
        handle.sub_timer = None
        self._wake_writer()

    # -- the socket -----------------------------------------------------------------

    def _raise_if_closed(self) -> None:
        if self._terminal is not None:
            raise self._closed_error()

    def _wake_writer(self) -> None:
        self._wake.set()

    def _writable(self, channel_id: str | None) -> bool:
        handle = self._channels.get(channel_id) if channel_id is not None else None
        return handle is not None and handle.status is Subscription.LIVE

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        loop = asyncio.get_running_loop()
        async with self._write_lock:
            wait = self._frames.take(loop.time())
            if wait:
                await asyncio.sleep(wait)  # the token is spent: one wait is enough
            await ws.send_str(text)

    async def _send_now(self, frame: Mapping[str, Any]) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            await self._write(ws, dumps(frame))
        except (aiohttp.ClientError, OSError, RuntimeError):
            return False
        return True

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, conn_no: int, url: str) -> Ended:
        opened_at = self._clock()
        self._ws = ws
        self._frames = FrameBudget(self._frame_rate, self._frame_burst)
        self._outbox.reset()
        self._writer_task = asyncio.get_running_loop().create_task(
            self._writer(ws, conn_no), name="waddle:multiplexed:writer"
        )
        self._opened_now(url)
        self._wake_writer()
        last: aiohttp.WSMessage | None = None
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame = self._parse(msg.data)
                if frame is not None:
                    self._handle(frame)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                self._emit(ErrorEvent("bad_frame", "binary frame from the server"))
            else:
                last = msg
                break
        return self._ended(ws, conn_no, "connection lost", opened_at, last)

    async def _disconnected(self) -> None:
        self._ws = None
        writer, self._writer_task = self._writer_task, None
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        for handle in list(self._channels.values()):
            handle._socket_lost()
        for channel_id in list(self._leaving):
            for future in self._leaving.pop(channel_id):
                if not future.done():
                    future.set_result(None)

    def _ending(self, error: Callable[[], ClientClosedError]) -> None:
        self._outbox.fail(error)

    async def _writer(self, ws: aiohttp.ClientWebSocketResponse, conn_no: int) -> None:
        try:
            while self._ws is ws:
                await self._wake.wait()
                self._wake.clear()
                for handle in list(self._channels.values()):
                    if self._ws is not ws:
                        return
                    if handle.status is Subscription.PENDING and handle.sub_timer is None:
                        after = handle._state.seq.last
                        frame: dict[str, Any] = {
                            "type": "subscribe",
                            "channelId": handle.channel_id,
                        }
                        if after is not None:
                            frame["afterSeq"] = after
                        handle.status = Subscription.SUBSCRIBING
                        handle.sub_conn = conn_no
                        handle.resume_after = after
                        await self._write(ws, dumps(frame))
                    elif handle.status is Subscription.LIVE:
                        for control in handle._state.control_frames():
                            await self._write(ws, dumps(control))
                while self._ws is ws:
                    item = self._outbox.take(conn_no, self._writable)
                    if item is None:
                        break
                    if isinstance(item, float):
                        await asyncio.sleep(item)  # pacing after a rate limit
                        continue
                    await self._write(ws, item.frame)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            # The reader sees the socket close and reconnects; what was not
            # acknowledged is written again on the next socket.
            log.info("write failed", extra={"error": str(exc)})
        except Exception:
            log.exception("writer failed")
            self._aborted = conn_no  # end this socket and reconnect
            await ws.close(code=CLOSE_NORMAL, message=b"client error")

    # -- incoming frames -----------------------------------------------------------------

    def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        raw_channel = frame.get("channelId")
        channel_id = raw_channel if isinstance(raw_channel, str) and raw_channel else None
        if kind == "ack":
            ack = Ack.from_wire(frame)
            out = self._outbox.on_ack(ack)
            if out is not None:
                handle = self._channels.get(out.channel_id or "")
                if handle is not None:
                    handle._on_ack(ack)
                else:
                    self._emit(ack)
            return
        if kind == "error":
            self._on_error(ErrorEvent.from_wire(frame), channel_id)
            return
        if channel_id is None:
            return  # pong, and frames about no channel that this client does not know
        if channel_id in self._leaving:
            if kind == "unsubscribed":
                self._left(channel_id)
            return
        handle = self._channels.get(channel_id)
        if handle is not None:
            handle._on_frame(kind, frame)

    def _on_error(self, error: ErrorEvent, channel_id: str | None) -> None:
        out = self._outbox.on_error(error)
        if out is not None:
            handle = self._channels.get(out.channel_id or "")
            if handle is not None:
                handle._emit(error)
            else:
                self._emit(error)
            return
        if channel_id is None:
            self._emit(error)  # about the socket, not a channel
            return
        if channel_id in self._leaving:
            if error.code == "not_subscribed":
                self._left(channel_id)
            return
        handle = self._channels.get(channel_id)
        if handle is None:
            self._emit(error)
        else:
            handle._on_error(error)

    def _background(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
