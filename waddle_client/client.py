"""``WaddleClient``: one channel of Waddle realtime over aiohttp's WebSocket client (v1).

The connection loop (``socket_loop.ReconnectingSocket``) connects to
``/channel/{id}/websocket``, waits for ``initial_state``, reads frames until
the socket closes, then either stops (``client.close()``, close code 1000
or 1008, a 401/403 refusal) or reconnects after a full-jitter exponential
backoff. A second task per connection writes: first a ``sync`` when one is
wanted, then the remembered presence, then every message of the
``Outbox`` not yet written on this connection. Messages stay in the outbox,
keyed by their ``clientMsgId``, until the server acknowledges them, so a
reconnect resends exactly the unacknowledged ones with the same id and the
server deduplicates.

Incoming frames go to the channel's ``ChannelState`` (its ``Sequencer``
gives exactly-once, in-order delivery); everything the application sees is
a typed event, fanned out to ``events()`` iterators and to callbacks
registered with ``on()``. ``WaddleConnection`` (``multiplexed``) speaks
v1.1 with the same pieces.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp

from waddle_client.channel import PRESENCE_STATUSES, ChannelState
from waddle_client.emitter import EventStream
from waddle_client.errors import ClientClosedError
from waddle_client.events import Ack, ErrorEvent, Event, OnlineUser
from waddle_client.outbox import Outbox, Outgoing, dumps
from waddle_client.socket_loop import (
    CLOSE_NORMAL,
    Ended,
    ReconnectingSocket,
    TokenSource,
    UrlSource,
    channel_socket_url,
)

__all__ = ["PRESENCE_STATUSES", "EventStream", "WaddleClient", "channel_socket_url"]

log = logging.getLogger("waddle_client")

E = TypeVar("E", bound=Event)


class WaddleClient(ReconnectingSocket):
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
        max_message_length: int = 4000,
        heartbeat: float | None = 30.0,
        open_timeout: float = 15.0,
        max_gap_syncs: int = 3,
        event_backlog: int = 10_000,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if not channel_id:
            raise ValueError("channel_id is required")
        self.channel_id = channel_id
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
            name=f"waddle:{channel_id}",
        )
        self._wake = asyncio.Event()
        self._outbox = Outbox(
            wake=self._wake.set,
            random=random,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            max_queue=max_queue,
            max_in_flight=max_in_flight,
            ack_timeout=ack_timeout,
            max_frame_bytes=max_frame_bytes,
            max_message_length=max_message_length,
        )
        self._channel = ChannelState(
            channel_id,
            emit=self._emit,
            wake=self._wake.set,
            random=random,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            max_gap_syncs=max_gap_syncs,
            multiplexed=False,
        )
        self._writer_task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None  # open connection

    def _socket_url(self, base: str) -> str:
        return channel_socket_url(base, self.channel_id)

    # -- properties -----------------------------------------------------------

    @property
    def online_users(self) -> Mapping[str, OnlineUser]:
        """Members online in the channel by user id, as the server last reported."""
        return types.MappingProxyType(dict(self._channel.online))

    @property
    def last_seq(self) -> int | None:
        """The highest seq handed to the application, ``None`` before the first connection."""
        return self._channel.seq.last

    @property
    def pending(self) -> tuple[str, ...]:
        """``clientMsgId``s of the messages awaiting their ack, oldest first."""
        return tuple(self._outbox.pending)

    async def flush(self) -> None:
        """Wait until every message pending now is acknowledged or has failed."""
        futures = self._outbox.futures()
        if futures:
            await asyncio.wait(futures)

    # -- sending ----------------------------------------------------------------

    async def send(self, content: str, thread_id: str | None = None) -> Ack:
        """Send a chat message and wait for its ``ack`` (it is then durable).

        Queued while disconnected and resent after reconnects until acked.
        Raises ``SendError`` when the server refuses it for good (or it is
        empty, too long or too big to send), ``QueueFullError`` when too
        many messages await their ack, and ``ClientClosedError`` when the
        client closes first. Cancelling the wait does not withdraw the message.
        """
        out = self._enqueue(content, thread_id)
        return await asyncio.shield(out.future)

    def send_nowait(self, content: str, thread_id: str | None = None) -> str:
        """Queue a chat message and return its ``clientMsgId`` at once.

        The outcome arrives as an ``Ack`` event (or an ``ErrorEvent`` with
        this ``client_msg_id``); ``flush()`` waits for all of them.
        """
        return self._enqueue(content, thread_id).client_msg_id

    def _enqueue(self, content: str, thread_id: str | None) -> Outgoing:
        if self._terminal is not None:
            raise self._closed_error()
        return self._outbox.enqueue(content, thread_id)

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
        self._channel.presence = status
        self._channel.presence_wanted = False
        return await self._send_now({"type": "presence", "status": status})

    async def _send_now(self, frame: Mapping[str, Any]) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            await self._write(ws, dumps(frame))
        except (aiohttp.ClientError, OSError, RuntimeError):
            return False
        return True

    # -- events -------------------------------------------------------------------

    def events(self) -> EventStream:
        """An async iterator over events from now on; ends when the client closes.

        The first stream also receives the events emitted before any stream
        existed (up to ``event_backlog`` of them), so ``async with client:
        async for event in client.events()`` misses nothing.
        """
        return self._events.stream()

    def on(
        self, event_type: type[E], callback: Callable[[E], Awaitable[None] | None]
    ) -> Callable[[], None]:
        """Call ``callback`` for every event of ``event_type`` (``Event`` for all).

        Callbacks run in order on one task of the client, after the event;
        a coroutine callback is awaited before the next event is dispatched.
        An exception in a callback is logged and reported as an
        ``ErrorEvent(code="callback")``. Returns a function that unsubscribes.
        """
        return self._events.on(event_type, callback)

    # -- the connection ---------------------------------------------------------------

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, conn_no: int, url: str) -> Ended:
        reconnect = self._channel.seq.last is not None
        opened_at: float | None = None
        reason = "connection lost"
        last: aiohttp.WSMessage | None = None
        try:
            async with asyncio.timeout(self._open_timeout):
                first = await ws.receive()
            if first.type is aiohttp.WSMsgType.TEXT:
                frame = self._parse(first.data)
                if frame is None or frame.get("type") != "initial_state":
                    self._emit(ErrorEvent("bad_frame", "the first frame was not initial_state"))
                    await ws.close()
                    return Ended(reason="no initial_state")
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
                        last = msg
                        break
            else:
                last = first
        except TimeoutError:
            reason = "timed out waiting for initial_state"
        return self._ended(ws, conn_no, reason, opened_at, last)

    def _open(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        conn_no: int,
        frame: Mapping[str, Any],
        url: str,
        reconnect: bool,
    ) -> None:
        self._channel.opened(frame, reconnect=reconnect, resumed_after=None)
        self._outbox.reset()  # everything unacknowledged goes out again, in order, same ids
        self._ws = ws
        self._writer_task = asyncio.get_running_loop().create_task(
            self._writer(ws, conn_no), name="waddle:writer"
        )
        self._wake.set()
        self._opened_now(url)

    async def _disconnected(self) -> None:
        self._ws = None
        writer, self._writer_task = self._writer_task, None
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        self._channel.lost()

    def _ending(self, error: Callable[[], ClientClosedError]) -> None:
        self._outbox.fail(error)

    async def _writer(self, ws: aiohttp.ClientWebSocketResponse, conn_no: int) -> None:
        try:
            while self._ws is ws:
                await self._wake.wait()
                self._wake.clear()
                for control in self._channel.control_frames():
                    await self._write(ws, dumps(control))
                while self._ws is ws:
                    item = self._outbox.take(conn_no)
                    if item is None:
                        break  # an ack or error wakes the writer
                    if isinstance(item, float):
                        await asyncio.sleep(item)  # pacing after a rate limit
                        continue
                    await self._write(ws, item.frame)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            # The reader sees the socket close and reconnects; what was not
            # acknowledged is written again on the next connection.
            log.info("write failed", extra={"channel_id": self.channel_id, "error": str(exc)})
        except Exception:
            log.exception("writer failed", extra={"channel_id": self.channel_id})
            self._aborted = conn_no  # end this connection and reconnect
            await ws.close(code=CLOSE_NORMAL, message=b"client error")

    # -- incoming frames ----------------------------------------------------------

    def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ack":
            ack = Ack.from_wire(frame)
            if self._outbox.on_ack(ack) is not None:
                self._channel.acked(ack)
                self._emit(ack)
        elif kind == "error":
            error = ErrorEvent.from_wire(frame)
            if self._outbox.on_error(error) is None:
                self._channel.on_error(error)
            self._emit(error)
        else:
            # `pong`, a repeated `initial_state` and unknown types are ignored
            # (forward compatibility).
            self._channel.handle(kind, frame)
