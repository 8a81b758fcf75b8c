"""Server-to-client frames of the v1/v1.1 protocol and the table of client-visible errors.

The channel owner encodes every frame exactly once (``orjson``) and ships the
bytes to the edges, which write them unchanged to each socket; the edge
encodes only the frames it answers itself (``pong``, its own ``error``\\s,
replay). Keeping encoders and the error table here means both sides speak
one vocabulary. Every frame about a channel carries a top-level
``channelId`` (v1.1; v1 clients ignore it), which is why the channel's id is
a required argument of those encoders. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class ErrorKind:
    code: str
    message: str
    retryable: bool = False


# Every error a client can receive in an `error` frame. The first three keep
# the seed protocol's words; clients match on `code`, people read `message`.
INVALID_FORMAT = ErrorKind("invalid_format", "Invalid message format")
UNKNOWN_TYPE = ErrorKind("unknown_type", "Unknown message type")
NO_WRITE_PERMISSION = ErrorKind("no_write_permission", "No write permission")
INVALID_FIELD = ErrorKind("invalid_field", "Invalid field")
MESSAGE_TOO_LONG = ErrorKind("message_too_long", "Message too long")
EMPTY_MESSAGE = ErrorKind("empty_message", "Message is empty")
BINARY_UNSUPPORTED = ErrorKind("binary_unsupported", "Binary frames are not supported")
UNKNOWN_MESSAGE_ID = ErrorKind("unknown_message_id", "Unknown message id")
SYNC_IN_PROGRESS = ErrorKind("sync_in_progress", "Sync already in progress")
# The owner did not know the connection (it had just restarted and the edge
# had not re-registered it yet): resending succeeds.
NOT_JOINED = ErrorKind("not_joined", "Not joined to this channel", retryable=True)
UNAVAILABLE = ErrorKind("unavailable", "Channel temporarily unavailable", retryable=True)
RATE_LIMITED = ErrorKind("rate_limited", "Rate limited", retryable=True)
REJECTED = ErrorKind("rejected", "Message could not be stored")
# Protocol v1.1 (the multiplexed endpoint): what v1 refuses before the
# upgrade, and subscription bookkeeping.
FORBIDDEN = ErrorKind("forbidden", "Forbidden")
CHANNEL_FULL = ErrorKind("channel_full", "Channel full", retryable=True)
USER_LIMIT = ErrorKind("user_limit", "Too many connections", retryable=True)
TOO_MANY_SUBSCRIPTIONS = ErrorKind("too_many_subscriptions", "Too many subscriptions")
NOT_SUBSCRIBED = ErrorKind("not_subscribed", "Not subscribed to this channel")
ALREADY_SUBSCRIBED = ErrorKind("already_subscribed", "Already subscribed to this channel")

ERRORS: tuple[ErrorKind, ...] = (
    INVALID_FORMAT,
    UNKNOWN_TYPE,
    NO_WRITE_PERMISSION,
    INVALID_FIELD,
    MESSAGE_TOO_LONG,
    EMPTY_MESSAGE,
    BINARY_UNSUPPORTED,
    UNKNOWN_MESSAGE_ID,
    SYNC_IN_PROGRESS,
    NOT_JOINED,
    UNAVAILABLE,
    RATE_LIMITED,
    REJECTED,
    FORBIDDEN,
    CHANNEL_FULL,
    USER_LIMIT,
    TOO_MANY_SUBSCRIPTIONS,
    NOT_SUBSCRIBED,
    ALREADY_SUBSCRIBED,
)
ERRORS_BY_CODE: Mapping[str, ErrorKind] = {e.code: e for e in ERRORS}

PRESENCE_STATUSES: frozenset[str] = frozenset({"online", "away", "dnd"})

# WebSocket close codes the server uses (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013
# Application range (4000-4999): the token expired while connected. Clients
# fetch a fresh token and reconnect.
CLOSE_TOKEN_EXPIRED = 4001


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return orjson.dumps(obj)


def kept(data: bytes) -> bytes:
    """``data`` in an allocation of its own length, for bytes kept for long.

    orjson returns its result in the 4 KiB working buffer it wrote into
    (``bytes(x)`` and ``x[:]`` return the same object), so every encoded
    value that is stored costs 4 KiB however short it is: 134 MB for a
    32,768-member channel's cached ``onlineUsers`` entries. A copy through a
    memoryview is exactly as long as the text."""
    return bytes(memoryview(data))


def error_frame(
    kind: ErrorKind, detail: str | None = None, *, channel_id: str | None = None, **extra: Any
) -> bytes:
    """An ``error`` frame; ``channel_id`` when it refuses something about a channel."""
    body: dict[str, Any] = {"type": "error"}
    if channel_id is not None:
        body["channelId"] = channel_id
    body["message"] = f"{kind.message}: {detail}" if detail else kind.message
    body["code"] = kind.code
    if kind.retryable:
        body["retryable"] = True
    body.update({k: v for k, v in extra.items() if v is not None})
    return _dumps(body)


def message_body(
    *,
    id: str,
    seq: int,
    channel_id: str,
    user_id: str,
    username: str,
    avatar_url: str,
    content: str,
    timestamp_ms: int,
    thread_id: str,
) -> dict[str, Any]:
    """The `message` object as clients see it, live, replayed or in `initial_state`."""
    return {
        "id": id,
        "seq": seq,
        "channelId": channel_id,
        "userId": user_id,
        "username": username,
        "avatarUrl": avatar_url or None,
        "content": content,
        "timestamp": timestamp_ms,
        "threadId": thread_id or None,
    }


def message_frame(body: Mapping[str, Any]) -> bytes:
    """A ``message`` frame; its top-level ``channelId`` is the message's own."""
    return _dumps({"type": "message", "channelId": body["channelId"], "message": body})


def ack_frame(
    *, channel_id: str, client_msg_id: str | None, id: str, seq: int, timestamp_ms: int
) -> bytes:
    return _dumps(
        {
            "type": "ack",
            "channelId": channel_id,
            "clientMsgId": client_msg_id,
            "id": id,
            "seq": seq,
            "timestamp": timestamp_ms,
        }
    )


def typing_frame(*, channel_id: str, user_id: str, username: str, is_typing: bool) -> bytes:
    return _dumps(
        {
            "type": "typing",
            "channelId": channel_id,
            "userId": user_id,
            "username": username,
            "isTyping": is_typing,
        }
    )


def presence_frame(*, channel_id: str, user_id: str, username: str, status: str) -> bytes:
    return _dumps(
        {
            "type": "presence",
            "channelId": channel_id,
            "userId": user_id,
            "username": username,
            "status": status,
        }
    )


def user_connected_frame(*, channel_id: str, user_id: str, username: str) -> bytes:
    return _dumps(
        {"type": "user_connected", "channelId": channel_id, "userId": user_id, "username": username}
    )


def user_disconnected_frame(*, channel_id: str, user_id: str, username: str) -> bytes:
    return _dumps(
        {
            "type": "user_disconnected",
            "channelId": channel_id,
            "userId": user_id,
            "username": username,
        }
    )


def read_frame(*, channel_id: str, user_id: str, seq: int) -> bytes:
    """A read cursor moved: to the user's other connections, and as a receipt to others."""
    return _dumps({"type": "read", "channelId": channel_id, "userId": user_id, "seq": seq})


def initial_state_frame(
    *,
    channel_id: str,
    messages: Iterable[Mapping[str, Any]],
    online_users: Iterable[Mapping[str, Any]] | bytes,
    online_count: int,
    last_seq: int,
    read_seq: int = 0,
) -> bytes:
    """``read_seq``: the joiner's read cursor when the owner knows it (the
    user has another connection here); the edge adds what the store knows.
    ``online_users`` may come encoded already (a JSON array), as the channel
    owner keeps it."""
    body: dict[str, Any] = {
        "type": "initial_state",
        "channelId": channel_id,
        "messages": list(messages),
        "onlineUsers": (
            orjson.Fragment(online_users) if isinstance(online_users, bytes) else list(online_users)
        ),
        "onlineCount": online_count,
        "lastSeq": last_seq,
    }
    if read_seq:
        body["readSeq"] = read_seq
    return _dumps(body)


def sync_complete_frame(*, last_seq: int, count: int, channel_id: str) -> bytes:
    return _dumps(
        {"type": "sync_complete", "channelId": channel_id, "lastSeq": last_seq, "count": count}
    )


def unsubscribed_frame(channel_id: str) -> bytes:
    return _dumps({"type": "unsubscribed", "channelId": channel_id})


PONG_FRAME: bytes = _dumps({"type": "pong"})
