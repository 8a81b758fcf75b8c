"""Per-channel state, shared by both clients, and the v1.1 ``ChannelHandle``.

``ChannelState`` is everything a client knows about one channel, whatever
socket carries it: the exactly-once ``Sequencer``, the online users (from
``initial_state``, ``presence``, ``user_connected``/``user_disconnected``
and ``presence_diff``), the remembered presence, the gap-filling ``sync``
and the user's read cursor with the unread count. It reads the channel's
frames and says which control frames (``sync``, ``presence``, ``read``) are
due on the next write; it does no I/O. ``WaddleClient`` (v1) keeps one;
``WaddleConnection`` (v1.1) keeps one per ``ChannelHandle``.

``ChannelHandle`` is what ``WaddleConnection.subscribe()`` returns: the
application's view of one channel on the shared socket (send, typing,
presence, read cursor, history, its own events).
"""

from __future__ import annotations

import asyncio
import enum
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from waddle_client.backoff import full_jitter_delay
from waddle_client.emitter import Emitter, EventStream
from waddle_client.errors import ClientClosedError
from waddle_client.events import (
    Ack,
    ChannelClosed,
    ErrorEvent,
    Event,
    InitialState,
    Message,
    OnlineUser,
    Presence,
    PresenceDiff,
    ReadReceipt,
    SyncComplete,
    Typing,
    UserConnected,
    UserDisconnected,
)
from waddle_client.outbox import Outgoing, consume
from waddle_client.sequencer import Outcome, Sequencer

if TYPE_CHECKING:
    from waddle_client.multiplexed import WaddleConnection

__all__ = ["PRESENCE_STATUSES", "ChannelHandle", "ChannelState", "Page", "Subscription"]

E = TypeVar("E", bound=Event)

PRESENCE_STATUSES: Final = frozenset({"online", "away", "dnd"})
MAX_HISTORY_LIMIT: Final = 100

# A refusal of a frame that names no message (a sync, a history page) which
# asking again later fixes.
RETRY_CODES: Final = frozenset({"rate_limited", "unavailable"})


class ChannelState:
    """What one client knows about one channel; no I/O."""

    def __init__(
        self,
        channel_id: str,
        *,
        emit: Callable[[Event], None],
        wake: Callable[[], None],
        random: Callable[[], float],
        backoff_base: float,
        backoff_cap: float,
        max_gap_syncs: int,
        multiplexed: bool,
    ) -> None:
        self.channel_id = channel_id
        self._emit = emit
        self._wake = wake
        self._random = random
        self._base = backoff_base
        self._cap = backoff_cap
        self._multiplexed = multiplexed
        self.seq = Sequencer(max_gap_syncs=max_gap_syncs)
        self.live = False
        self.online: dict[str, OnlineUser] = {}
        self.user_id: str | None = None
        """This user's id: the server lists the connecting user first in ``onlineUsers``."""
        self.presence: str | None = None
        self.presence_wanted = False
        self.sync_wanted = False
        self._sync_retries = 0
        self._sync_timer: asyncio.TimerHandle | None = None
        self.head = 0
        """The highest seq known to exist in the channel."""
        self.read_seq: int | None = None
        self._read_target = 0  # the highest seq this client marked read
        self.read_wanted = False

    @property
    def unread_count(self) -> int | None:
        if self.read_seq is None:
            return None
        return max(0, self.head - self.read_seq)

    # -- connection life -------------------------------------------------------

    def opened(
        self, frame: Mapping[str, Any], *, reconnect: bool, resumed_after: int | None
    ) -> None:
        """The channel's ``initial_state`` arrived (``resumed_after``: it answers
        a ``subscribe {afterSeq}``, whose replay follows)."""
        state = InitialState.from_wire(frame, reconnect=reconnect)
        self.online = {u.user_id: u for u in state.online_users}
        if state.online_users:
            self.user_id = state.online_users[0].user_id
        self.head = state.last_seq
        if state.read_seq is not None:
            self.read_seq = max(state.read_seq, self._read_target)
        elif self.read_seq is not None:
            self.read_seq = min(self.read_seq, self.head)
        self._emit(state)
        self.seq.connection_lost()
        if resumed_after is not None:
            outcome = self.seq.on_resume(state, resumed_after)
        else:
            outcome = self.seq.on_initial_state(state, reconnect=reconnect)
        self.sync_wanted = False
        self._sync_retries = 0
        self.live = True
        self.apply(outcome)
        self.presence_wanted = self.presence is not None and self.presence != "online"
        # A read marked just before a drop may not have reached the server.
        self.read_wanted = self._multiplexed and self._read_target > (state.read_seq or 0)
        self._wake()

    def lost(self) -> None:
        """The socket carrying the channel is gone."""
        self.live = False
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        self.seq.connection_lost()

    # -- incoming --------------------------------------------------------------

    def handle(self, kind: object, frame: Mapping[str, Any]) -> bool:
        """Act on one of the channel's frames; False for a type it does not know."""
        if kind == "message":
            body = frame.get("message")
            if isinstance(body, Mapping):
                self.apply(self.seq.offer(Message.from_wire(body)))
        elif kind == "sync_complete":
            event = SyncComplete.from_wire(frame)
            self._sync_retries = 0
            self.apply(self.seq.on_sync_complete())
            self._emit(event)
        elif kind == "typing":
            self._emit(Typing.from_wire(frame))
        elif kind == "presence":
            presence = Presence.from_wire(frame)
            known = self.online.get(presence.user_id)
            self.online[presence.user_id] = OnlineUser(
                user_id=presence.user_id,
                username=presence.username,
                status=presence.status,
                joined_at=known.joined_at if known is not None else None,
            )
            self._emit(presence)
        elif kind == "user_connected":
            connected = UserConnected.from_wire(frame)
            if connected.user_id not in self.online:
                self.online[connected.user_id] = OnlineUser(
                    connected.user_id, connected.username, joined_at=_now_ms()
                )
            self._emit(connected)
        elif kind == "user_disconnected":
            gone = UserDisconnected.from_wire(frame)
            self.online.pop(gone.user_id, None)
            self._emit(gone)
        elif kind == "presence_diff":
            diff = PresenceDiff.from_wire(frame)
            for user in diff.leaves:
                self.online.pop(user.user_id, None)
            for user in diff.joins:
                if user.user_id not in self.online:
                    self.online[user.user_id] = OnlineUser(
                        user.user_id, user.username, user.status, joined_at=_now_ms()
                    )
            self._emit(diff)
        elif kind == "read":
            receipt = ReadReceipt.from_wire(frame)
            own = self.user_id is not None and receipt.user_id == self.user_id
            if own:
                self._read_up_to(receipt.seq)
                receipt = ReadReceipt.from_wire(frame, own=True)
            self._emit(receipt)
        else:
            return False
        return True

    def apply(self, outcome: Outcome) -> None:
        if outcome.history_reset:
            self._emit(
                ErrorEvent(
                    "history_reset",
                    "the channel's history was reset on the server",
                    channel_id=self.channel_id if self._multiplexed else "",
                )
            )
        for message in outcome.deliver:
            self.head = max(self.head, message.seq)
            if self.user_id is not None and message.user_id == self.user_id:
                self._read_up_to(message.seq)  # sending moves the sender's cursor
            self._emit(message)
        if outcome.gap_skipped is not None:
            first, last = outcome.gap_skipped
            self._emit(
                ErrorEvent(
                    "gap_skipped",
                    f"messages {first} to {last} could not be read",
                    channel_id=self.channel_id if self._multiplexed else "",
                )
            )
        if outcome.want_sync and not self.seq.sync_outstanding:
            self.sync_wanted = True
            self._wake()

    def acked(self, ack: Ack) -> None:
        """One of this client's messages is stored: it moved the user's cursor."""
        self.head = max(self.head, ack.seq)
        self._read_up_to(ack.seq)

    def _read_up_to(self, seq: int) -> None:
        self.read_seq = max(self.read_seq or 0, seq)

    def on_error(self, error: ErrorEvent) -> None:
        """An error naming no message: a refused ``sync`` is asked again later."""
        if not self.seq.sync_outstanding:
            return
        if error.code == "sync_in_progress":
            self._retry_sync(None)
        elif self._multiplexed and error.code in RETRY_CODES:
            self._retry_sync(error.retry_after)

    def _retry_sync(self, retry_after: float | None) -> None:
        self.seq.sync_refused()
        delay = full_jitter_delay(
            self._sync_retries, self._random(), base=self._base, cap=self._cap
        )
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._sync_retries += 1
        if self._sync_timer is not None:
            self._sync_timer.cancel()
        self._sync_timer = asyncio.get_running_loop().call_later(delay, self._want_sync)

    def _want_sync(self) -> None:
        self._sync_timer = None
        if self.live and not self.seq.sync_outstanding:
            self.sync_wanted = True
            self._wake()

    # -- outgoing --------------------------------------------------------------

    def mark_read(self, seq: int | None) -> int | None:
        """Move the read cursor to ``seq`` (None: the last delivered message)."""
        target = self.seq.last if seq is None else seq
        if target is None or target < 1:
            return self.read_seq
        target = min(target, self.head) if self.head else target
        if self.read_seq is not None and target <= self.read_seq:
            return self.read_seq  # never backwards
        self._read_target = max(self._read_target, target)
        self.read_seq = target
        self.read_wanted = True
        self._wake()
        return self.read_seq

    def control_frames(self) -> list[dict[str, Any]]:
        """The ``sync``, ``presence`` and ``read`` frames due now (marked as sent)."""
        frames: list[dict[str, Any]] = []
        if self.sync_wanted and not self.seq.sync_outstanding:
            self.sync_wanted = False
            frames.append({"type": "sync", "afterSeq": self.seq.sync_started()})
        if self.presence_wanted and self.presence is not None:
            self.presence_wanted = False
            frames.append({"type": "presence", "status": self.presence})
        if self.read_wanted and self._read_target > 0:
            self.read_wanted = False
            frames.append({"type": "read", "seq": self._read_target})
        if self._multiplexed:
            for frame in frames:
                frame["channelId"] = self.channel_id
        return frames


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- v1.1 ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    """One page of history: ``messages`` oldest first, ``has_more`` when older ones exist."""

    messages: tuple[Message, ...]
    has_more: bool

    @property
    def first_seq(self) -> int | None:
        """The seq to pass as ``before_seq`` for the next (older) page."""
        return self.messages[0].seq if self.messages else None


class Subscription(enum.StrEnum):
    """Where a channel handle is on the current socket."""

    PENDING = "pending"
    """A ``subscribe`` is due (not written on this socket yet, or waiting to retry)."""
    SUBSCRIBING = "subscribing"
    """``subscribe`` written, ``initial_state`` not received yet."""
    LIVE = "live"
    """Subscribed on the current socket."""
    CLOSED = "closed"
    """Terminal: unsubscribed, refused for good, or the connection closed."""


@dataclass(slots=True)
class _HistoryRequest:
    key: tuple[str | None, int | None]
    frame: dict[str, Any]
    answer: asyncio.Future[Page | float | None]
    """A page; seconds to wait before asking again (a refusal); None (socket lost)."""


class ChannelHandle:
    """One channel of a ``WaddleConnection``, returned by ``subscribe()``.

    Iterate it (``async for event in handle``) for the channel's events:
    ``InitialState`` on every (re)subscription, each ``Message`` exactly
    once and in seq order, ``Ack``, ``Typing``, ``Presence``,
    ``PresenceDiff``, ``ReadReceipt``, ``SyncComplete``, ``ErrorEvent``\\s
    about the channel and the connection's ``ConnectionState`` changes; the
    iteration ends after ``ChannelClosed``.
    """

    def __init__(
        self, connection: WaddleConnection, channel_id: str, *, event_backlog: int
    ) -> None:
        self.channel_id = channel_id
        self._conn = connection
        self._events = Emitter(backlog=event_backlog, name=f"waddle:{channel_id}:callbacks")
        self._state = ChannelState(
            channel_id,
            emit=self._emit,
            wake=connection._wake_writer,
            random=connection._random,
            backoff_base=connection._backoff.base,
            backoff_cap=connection._backoff.cap,
            max_gap_syncs=connection._max_gap_syncs,
            multiplexed=True,
        )
        self._state.presence = connection._presence
        self.status = Subscription.PENDING
        self.sub_conn: int | None = None  # the socket the subscribe was written on
        self.resume_after: int | None = None  # its afterSeq
        self.sub_retries = 0
        self.sub_timer: asyncio.TimerHandle | None = None
        self._subscribed_once = False
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._first.add_done_callback(consume)
        self._live = asyncio.Event()
        self._closed: ClientClosedError | None = None
        self._make_closed: Callable[[], ClientClosedError] | None = None
        self._history_lock = asyncio.Lock()
        self._history: _HistoryRequest | None = None

    def __repr__(self) -> str:
        return f"<ChannelHandle {self.channel_id!r} {self.status}>"

    # -- properties ----------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        """Subscribed on the current socket (False while reconnecting)."""
        return self.status is Subscription.LIVE

    @property
    def closed_reason(self) -> ClientClosedError | None:
        """Why the handle closed, once it has."""
        return self._closed

    @property
    def online_users(self) -> Mapping[str, OnlineUser]:
        """Members online in the channel by user id, as the server last reported."""
        return types.MappingProxyType(dict(self._state.online))

    @property
    def last_seq(self) -> int | None:
        """The highest seq handed to the application (``None`` before ``initial_state``)."""
        return self._state.seq.last

    @property
    def read_seq(self) -> int | None:
        """This user's read cursor (``None`` while the server could not tell it)."""
        return self._state.read_seq

    @property
    def unread_count(self) -> int | None:
        """Messages after ``read_seq``; ``None`` while the cursor is unknown."""
        return self._state.unread_count

    @property
    def user_id(self) -> str | None:
        """This connection's user id, as the server reported it."""
        return self._state.user_id

    @property
    def pending(self) -> tuple[str, ...]:
        """``clientMsgId``s of this channel's messages awaiting their ack, oldest first."""
        return tuple(
            o.client_msg_id
            for o in self._conn._outbox.pending.values()
            if o.channel_id == self.channel_id
        )

    # -- events --------------------------------------------------------------

    def events(self) -> EventStream:
        """An async iterator over the channel's events from now on (the first
        one also gets those emitted before it); ends after ``ChannelClosed``."""
        return self._events.stream()

    def __aiter__(self) -> EventStream:
        return self.events()

    def on(
        self, event_type: type[E], callback: Callable[[E], Awaitable[None] | None]
    ) -> Callable[[], None]:
        """Call ``callback`` for each of the channel's events of ``event_type``."""
        return self._events.on(event_type, callback)

    def _emit(self, event: Event) -> None:
        self._events.emit(event)
        self._conn._emit(event)

    # -- sending --------------------------------------------------------------

    async def send(self, content: str, thread_id: str | None = None) -> Ack:
        """Send a message and wait for its ``ack`` (it is then durable).

        Queued while offline and resent with the same ``clientMsgId`` until
        acknowledged, exactly once. Raises ``SendError`` when refused for
        good, ``QueueFullError`` when the connection's queue is full, and
        ``ClientClosedError`` (``ChannelClosedError``) when the channel or
        the connection closes first. Cancelling the wait does not withdraw
        the message.
        """
        out = self._enqueue(content, thread_id)
        return await asyncio.shield(out.future)

    def send_nowait(self, content: str, thread_id: str | None = None) -> str:
        """Queue a message and return its ``clientMsgId``; the outcome comes
        as an ``Ack`` event (or an ``ErrorEvent`` with that ``client_msg_id``)."""
        return self._enqueue(content, thread_id).client_msg_id

    def _enqueue(self, content: str, thread_id: str | None) -> Outgoing:
        self._raise_if_closed()
        return self._conn._outbox.enqueue(content, thread_id, channel_id=self.channel_id)

    async def flush(self) -> None:
        """Wait until each of the channel's messages pending now is acknowledged or failed."""
        futures = self._conn._outbox.futures(self.channel_id)
        if futures:
            await asyncio.wait(futures)

    async def typing(self, is_typing: bool = True) -> bool:
        """Say whether the user is typing; not queued: False (nothing sent) while offline."""
        if self.status is not Subscription.LIVE:
            return False
        return await self._conn._send_now(
            {"type": "typing", "channelId": self.channel_id, "isTyping": bool(is_typing)}
        )

    async def presence(self, status: str) -> bool:
        """Set the user's status here (``online``, ``away``, ``dnd``).

        Remembered and announced again after every reconnect; returns
        whether it was sent now.
        """
        if status not in PRESENCE_STATUSES:
            raise ValueError(f"status must be one of {sorted(PRESENCE_STATUSES)}")
        self._raise_if_closed()
        self._state.presence = status
        self._state.presence_wanted = False
        if self.status is not Subscription.LIVE:
            return False
        return await self._conn._send_now(
            {"type": "presence", "channelId": self.channel_id, "status": status}
        )

    async def mark_read(self, seq: int | None = None) -> int | None:
        """Move this user's read cursor to ``seq`` (None: the last message
        delivered); returns the cursor. It never moves back; a ``read`` is
        sent now, or after the next (re)subscription when offline."""
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
            raise ValueError("seq must be a positive integer or None")
        self._raise_if_closed()
        return self._state.mark_read(seq)

    # -- history --------------------------------------------------------------

    async def history(
        self,
        before_seq: int | None = None,
        limit: int = 50,
        thread_id: str | None = None,
    ) -> Page:
        """One page of the channel's past, oldest first: the newest ``limit``
        messages, or those before ``before_seq``; with ``thread_id`` (a root
        message's id) that thread's replies only.

        Waits while offline; a refusal (``rate_limited``, ``unavailable``)
        is asked again after the server's ``retryAfterMs``. Bound the wait
        with ``asyncio.timeout``.
        """
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100:
            raise ValueError(f"limit must be 1 to {MAX_HISTORY_LIMIT}")
        if before_seq is not None and (
            not isinstance(before_seq, int) or isinstance(before_seq, bool) or before_seq < 1
        ):
            raise ValueError("before_seq must be a positive integer or None")
        if thread_id is not None and (not isinstance(thread_id, str) or not thread_id):
            raise ValueError("thread_id must be a non-empty string or None")
        frame: dict[str, Any] = {"type": "history", "channelId": self.channel_id, "limit": limit}
        if before_seq is not None:
            frame["beforeSeq"] = before_seq
        if thread_id is not None:
            frame["threadId"] = thread_id
        loop = asyncio.get_running_loop()
        retries = 0
        async with self._history_lock:
            while True:
                await self._until_live()
                request = _HistoryRequest((thread_id, before_seq), frame, loop.create_future())
                self._history = request
                try:
                    # A write that fails (the socket is going) is asked again shortly.
                    sent = await self._conn._send_now(frame)
                    answer = await request.answer if sent else 0.0
                finally:
                    self._history = None
                if isinstance(answer, Page):
                    return answer
                if answer is not None:
                    delay = full_jitter_delay(
                        retries,
                        self._conn._random(),
                        base=self._conn._backoff.base,
                        cap=self._conn._backoff.cap,
                    )
                    retries += 1
                    await asyncio.sleep(max(answer, delay))
                # None: the socket was lost; ask again once subscribed anew.

    async def pages(
        self,
        before_seq: int | None = None,
        limit: int = 50,
        thread_id: str | None = None,
    ) -> AsyncIterator[Page]:
        """Page backwards from the newest message (or ``before_seq``) until the first."""
        while True:
            page = await self.history(before_seq, limit, thread_id)
            yield page
            if not page.has_more or page.first_seq is None:
                return
            before_seq = page.first_seq

    # -- subscription ---------------------------------------------------------------

    async def unsubscribe(self) -> None:
        """Leave the channel: its iteration ends with ``ChannelClosed``; its
        unacknowledged sends fail with ``ChannelClosedError`` (``flush()``
        first to wait for them)."""
        await self._conn._unsubscribe(self)

    def _raise_if_closed(self) -> None:
        if self._make_closed is not None:
            raise self._make_closed()
        self._conn._raise_if_closed()

    async def _until_live(self) -> None:
        """Wait until subscribed on the current socket; raise once closed."""
        while self.status is not Subscription.LIVE:
            self._raise_if_closed()
            self._live.clear()
            await self._live.wait()  # set by initial_state and by _close

    async def _wait_first(self) -> None:
        await asyncio.shield(self._first)

    # -- driven by the connection ----------------------------------------------------

    def _on_initial_state(self, frame: Mapping[str, Any]) -> None:
        if self.status is not Subscription.SUBSCRIBING:
            return
        self.status = Subscription.LIVE
        self.sub_retries = 0
        self._state.opened(frame, reconnect=self._subscribed_once, resumed_after=self.resume_after)
        self._subscribed_once = True
        self._live.set()
        if not self._first.done():
            self._first.set_result(None)

    def _on_frame(self, kind: object, frame: Mapping[str, Any]) -> None:
        if kind == "initial_state":
            self._on_initial_state(frame)
        elif self.status is not Subscription.LIVE:
            return  # left over from an earlier subscription
        elif kind == "history":
            self._on_history(frame)
        else:
            self._state.handle(kind, frame)

    def _on_history(self, frame: Mapping[str, Any]) -> None:
        request = self._history
        thread = frame.get("threadId")
        before = frame.get("beforeSeq")
        key = (
            thread if isinstance(thread, str) else None,
            before if isinstance(before, int) else None,
        )
        if request is None or request.key != key or request.answer.done():
            return  # an answer nobody waits for (a repeat after a refusal)
        raw = frame.get("messages")
        messages = tuple(Message.from_wire(m) for m in (raw or ()) if isinstance(m, Mapping))
        request.answer.set_result(Page(messages, frame.get("hasMore") is True))

    def _on_ack(self, ack: Ack) -> None:
        self._state.acked(ack)
        self._emit(ack)

    def _on_error(self, error: ErrorEvent) -> None:
        """An error about this channel that names none of its messages."""
        if self.status is Subscription.SUBSCRIBING:
            self._conn._subscribe_refused(self, error)
            return
        if self.status is Subscription.LIVE:
            self._state.on_error(error)
            request = self._history
            if request is not None and error.code in RETRY_CODES and not request.answer.done():
                request.answer.set_result(error.retry_after or 0.0)
        self._emit(error)

    def _socket_lost(self) -> None:
        if self.status is Subscription.CLOSED:
            return
        self.status = Subscription.PENDING
        self.sub_conn = None
        self._live.clear()
        self._state.lost()
        request = self._history
        if request is not None and not request.answer.done():
            request.answer.set_result(None)

    def _close(self, make_error: Callable[[], ClientClosedError], code: str | None = None) -> None:
        """Enter the terminal state: fail pending sends, end the events."""
        if self._closed is not None:
            return
        error = self._closed = make_error()
        self._make_closed = make_error
        self.status = Subscription.CLOSED
        if self.sub_timer is not None:
            self.sub_timer.cancel()
            self.sub_timer = None
        self._state.lost()
        self._live.set()
        request = self._history
        if request is not None and not request.answer.done():
            request.answer.set_result(None)
        self._conn._outbox.fail(make_error, channel_id=self.channel_id)
        if not self._first.done():
            self._first.set_exception(make_error())
        self._emit(ChannelClosed(self.channel_id, error.reason, code))
        self._events.end()
