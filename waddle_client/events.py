"""Typed events the client hands to the application.

Every event is a frozen dataclass deriving from ``Event``, so an application
can subscribe to one kind (``client.on(Message, cb)``) or to all of them
(``client.on(Event, cb)``), and ``match`` on them when iterating
``client.events()``. The ``from_wire`` constructors turn the JSON objects of
the v1 and v1.1 protocols into these types and tolerate missing optional
fields. Events about a channel carry its ``channel_id`` (the server names the
channel in every such frame; it is empty when a frame did not).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Ack",
    "ChannelClosed",
    "ConnectionState",
    "ErrorEvent",
    "Event",
    "InitialState",
    "Message",
    "OnlineUser",
    "Presence",
    "PresenceDiff",
    "ReadReceipt",
    "State",
    "SyncComplete",
    "Typing",
    "UserConnected",
    "UserDisconnected",
]


def _str(data: Mapping[str, Any], key: str, default: str = "") -> str:
    value = data.get(key)
    return value if isinstance(value, str) else default


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None


def _int(data: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = data.get(key)
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def _opt_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


class State(enum.StrEnum):
    """Where the connection is in its life."""

    CONNECTING = "connecting"
    """The first connection attempt is under way."""
    OPEN = "open"
    """Connected: ``initial_state`` was received and queued sends were written."""
    RECONNECTING = "reconnecting"
    """The connection was lost; the next attempt is scheduled after a backoff."""
    CLOSED = "closed"
    """Terminal: the application closed the client, or the server refused it."""


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every event."""


@dataclass(frozen=True, slots=True)
class Message(Event):
    """A chat message. Delivered exactly once per ``seq``, in ``seq`` order."""

    id: str
    seq: int
    channel_id: str
    user_id: str
    username: str
    content: str
    timestamp: int
    """Milliseconds since the Unix epoch (server time)."""
    thread_id: str | None = None
    avatar_url: str | None = None
    reply_count: int = 0
    """Replies to this message (a thread root), in ``history`` pages only."""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Message:
        return cls(
            id=_str(data, "id"),
            seq=_int(data, "seq"),
            channel_id=_str(data, "channelId"),
            user_id=_str(data, "userId"),
            username=_str(data, "username"),
            content=_str(data, "content"),
            timestamp=_int(data, "timestamp"),
            thread_id=_opt_str(data, "threadId"),
            avatar_url=_opt_str(data, "avatarUrl"),
            reply_count=_int(data, "replyCount"),
        )


@dataclass(frozen=True, slots=True)
class OnlineUser:
    """A member currently connected to the channel (not an event)."""

    user_id: str
    username: str
    status: str = "online"
    """``online``, ``away`` or ``dnd``."""
    joined_at: int | None = None
    """Milliseconds since the epoch, when the server reported it."""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> OnlineUser:
        return cls(
            user_id=_str(data, "userId"),
            username=_str(data, "username"),
            status=_str(data, "status", "online"),
            joined_at=_opt_int(data, "joinedAt"),
        )


@dataclass(frozen=True, slots=True)
class InitialState(Event):
    """The first frame of every connection (the first and each reconnect).

    Its ``messages`` are also delivered as ``Message`` events, through the
    exactly-once filter: render messages from those events, not from here.
    """

    channel_id: str
    messages: tuple[Message, ...]
    online_users: tuple[OnlineUser, ...]
    last_seq: int
    reconnect: bool = False
    """False for the first connection of this client (or first subscribe of
    this channel handle), True afterwards."""
    read_seq: int | None = None
    """This user's read cursor, when the server could read it."""
    unread_count: int | None = None
    """Messages after ``read_seq`` (the server caps it at 1000)."""
    online_count: int | None = None
    """All online users (``online_users`` may be capped)."""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any], *, reconnect: bool = False) -> InitialState:
        raw_messages = data.get("messages")
        raw_users = data.get("onlineUsers")
        messages = tuple(
            Message.from_wire(m) for m in (raw_messages or ()) if isinstance(m, Mapping)
        )
        users = tuple(OnlineUser.from_wire(u) for u in (raw_users or ()) if isinstance(u, Mapping))
        return cls(
            channel_id=_str(data, "channelId"),
            messages=messages,
            online_users=users,
            last_seq=_int(data, "lastSeq"),
            reconnect=reconnect,
            read_seq=_opt_int(data, "readSeq"),
            unread_count=_opt_int(data, "unreadCount"),
            online_count=_opt_int(data, "onlineCount"),
        )


@dataclass(frozen=True, slots=True)
class Ack(Event):
    """The server made one of this client's messages durable.

    The result of ``await client.send(...)``, and also emitted as an event
    (useful with ``send_nowait``).
    """

    client_msg_id: str
    id: str
    seq: int
    timestamp: int
    channel_id: str = ""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Ack:
        return cls(
            client_msg_id=_str(data, "clientMsgId"),
            id=_str(data, "id"),
            seq=_int(data, "seq"),
            timestamp=_int(data, "timestamp"),
            channel_id=_str(data, "channelId"),
        )


@dataclass(frozen=True, slots=True)
class Typing(Event):
    """Another member started or stopped typing."""

    user_id: str
    username: str
    is_typing: bool
    channel_id: str = ""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Typing:
        return cls(
            user_id=_str(data, "userId"),
            username=_str(data, "username"),
            is_typing=data.get("isTyping") is True,
            channel_id=_str(data, "channelId"),
        )


@dataclass(frozen=True, slots=True)
class Presence(Event):
    """A member changed status (``online``, ``away``, ``dnd``)."""

    user_id: str
    username: str
    status: str
    channel_id: str = ""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Presence:
        return cls(
            user_id=_str(data, "userId"),
            username=_str(data, "username"),
            status=_str(data, "status", "online"),
            channel_id=_str(data, "channelId"),
        )


@dataclass(frozen=True, slots=True)
class UserConnected(Event):
    """A user's first connection to the channel (v1; v1.1 sends ``PresenceDiff``)."""

    user_id: str
    username: str
    channel_id: str = ""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> UserConnected:
        return cls(
            user_id=_str(data, "userId"),
            username=_str(data, "username"),
            channel_id=_str(data, "channelId"),
        )


@dataclass(frozen=True, slots=True)
class UserDisconnected(Event):
    """A user's last connection to the channel went away (v1; v1.1 sends ``PresenceDiff``)."""

    user_id: str
    username: str
    channel_id: str = ""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> UserDisconnected:
        return cls(
            user_id=_str(data, "userId"),
            username=_str(data, "username"),
            channel_id=_str(data, "channelId"),
        )


@dataclass(frozen=True, slots=True)
class PresenceDiff(Event):
    """Who arrived in and who left a channel within a short window (v1.1)."""

    joins: tuple[OnlineUser, ...]
    leaves: tuple[OnlineUser, ...]
    channel_id: str = ""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> PresenceDiff:
        def users(key: str) -> tuple[OnlineUser, ...]:
            raw = data.get(key)
            if not isinstance(raw, list):
                return ()
            return tuple(OnlineUser.from_wire(u) for u in raw if isinstance(u, Mapping))

        return cls(joins=users("joins"), leaves=users("leaves"), channel_id=_str(data, "channelId"))


@dataclass(frozen=True, slots=True)
class ReadReceipt(Event):
    """A read cursor moved to ``seq``.

    ``own`` is True for this user's own cursor, moved by another of the
    user's connections; otherwise another member read up to ``seq``.
    """

    user_id: str
    seq: int
    channel_id: str = ""
    own: bool = False

    @classmethod
    def from_wire(cls, data: Mapping[str, Any], *, own: bool = False) -> ReadReceipt:
        return cls(
            user_id=_str(data, "userId"),
            seq=_int(data, "seq"),
            channel_id=_str(data, "channelId"),
            own=own,
        )


@dataclass(frozen=True, slots=True)
class ChannelClosed(Event):
    """The last event of a channel handle: it was unsubscribed, refused for
    good (``code`` is the server's, e.g. ``forbidden``), or its connection
    closed (``code`` None, ``reason`` says why)."""

    channel_id: str
    reason: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class SyncComplete(Event):
    """The server finished replaying what a ``sync`` asked for."""

    last_seq: int
    count: int
    channel_id: str = ""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> SyncComplete:
        return cls(
            last_seq=_int(data, "lastSeq"),
            count=_int(data, "count"),
            channel_id=_str(data, "channelId"),
        )


@dataclass(frozen=True, slots=True)
class ErrorEvent(Event):
    """Something went wrong; the connection usually carries on.

    Server ``error`` frames keep their ``code`` (``unavailable``,
    ``no_write_permission``, ...). The client adds its own codes:
    ``token_provider`` (the token provider raised), ``url_provider``,
    ``bad_frame`` (the server sent something unreadable), ``history_reset``
    (the channel's history went backwards), ``gap_skipped`` (a gap could not
    be filled after repeated syncs) and ``callback`` (an event callback raised).
    ``channel_id`` names the channel the error is about, when it is about one.
    """

    code: str
    message: str
    retryable: bool = False
    client_msg_id: str | None = None
    retry_after: float | None = None
    """Seconds the server asks to wait (``retryAfterMs``)."""
    channel_id: str = ""

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ErrorEvent:
        retry_ms = _opt_int(data, "retryAfterMs")
        return cls(
            code=_str(data, "code", "error"),
            message=_str(data, "message", "Error"),
            retryable=data.get("retryable") is True,
            client_msg_id=_opt_str(data, "clientMsgId"),
            retry_after=retry_ms / 1000 if retry_ms is not None else None,
            channel_id=_str(data, "channelId"),
        )


@dataclass(frozen=True, slots=True)
class ConnectionState(Event):
    """The connection changed state.

    ``reconnecting`` events carry the backoff ``attempt`` (0-based) and the
    ``delay`` in seconds before it; ``closed`` events carry why: the close
    ``close_code`` (1008, 1000, ...), the HTTP ``http_status`` of a refused
    upgrade (401, 403), or ``None`` for both after ``client.close()``.
    """

    state: State
    reason: str | None = None
    close_code: int | None = None
    http_status: int | None = None
    attempt: int | None = None
    delay: float | None = None
    url: str | None = None
