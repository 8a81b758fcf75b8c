"""The client-to-server half of the wire protocol (v1 and v1.1), with no I/O.

``parse_frame`` turns the text of one WebSocket frame into the channel it
names (v1.1) and one of a closed set of frozen dataclasses, or raises
``ProtocolError`` carrying the ``ErrorKind`` (and detail) the client is
told, and the channel when the frame named a valid one. Everything a client
can send is validated here: JSON shape, frame type, every field's type and
range. Authorisation (``write``) and sequencing belong to the channel owner.

On the v1 endpoint (one channel per socket) a frame's ``channelId`` is
ignored and ``subscribe``/``unsubscribe`` are unknown. On the multiplexed
endpoint every frame but ``ping`` must name its channel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from waddle_common import wire

MAX_THREAD_ID_LENGTH = 128
MAX_CLIENT_MSG_ID_LENGTH = 128
MAX_MESSAGE_ID_LENGTH = 128
MAX_HISTORY_LIMIT = 100
DEFAULT_HISTORY_LIMIT = 50
MAX_SEQ = 2**63 - 1
# Channel ids: the whole string must match (``fullmatch``), so that no
# trailing newline or other byte slips past an anchored prefix.
CHANNEL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def valid_channel_id(value: object) -> bool:
    return isinstance(value, str) and CHANNEL_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class SendMessage:
    content: str
    thread_id: str | None = None
    client_msg_id: str | None = None


@dataclass(frozen=True, slots=True)
class SetTyping:
    is_typing: bool


@dataclass(frozen=True, slots=True)
class SetPresence:
    status: str


@dataclass(frozen=True, slots=True)
class Sync:
    after_seq: int | None = None
    after_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Subscribe:
    after_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    pass


@dataclass(frozen=True, slots=True)
class History:
    before_seq: int | None = None
    limit: int = DEFAULT_HISTORY_LIMIT
    thread_id: str | None = None


@dataclass(frozen=True, slots=True)
class MarkRead:
    seq: int


ClientFrame = (
    SendMessage
    | SetTyping
    | SetPresence
    | Sync
    | Ping
    | Subscribe
    | Unsubscribe
    | History
    | MarkRead
)


class ProtocolError(Exception):
    """A frame the server refuses; the connection stays open."""

    def __init__(self, kind: wire.ErrorKind, detail: str | None = None) -> None:
        super().__init__(f"{kind.code}: {detail}" if detail else kind.code)
        self.kind = kind
        self.detail = detail
        self.channel_id: str | None = None  # set when the frame named a valid channel

    def frame(self, channel_id: str | None = None, **extra: Any) -> bytes:
        """The error frame, naming the frame's channel (or ``channel_id``, the socket's)."""
        channel = self.channel_id if self.channel_id is not None else channel_id
        return wire.error_frame(self.kind, self.detail, channel_id=channel, **extra)


def _field_error(detail: str) -> ProtocolError:
    return ProtocolError(wire.INVALID_FIELD, detail)


def _no_nul(value: str, key: str) -> str:
    # NUL cannot be stored in PostgreSQL text; refuse it everywhere alike.
    if "\x00" in value:
        raise _field_error(f"{key} must not contain NUL characters")
    return value


def _optional_short_str(data: dict[str, Any], key: str, limit: int) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _field_error(f"{key} must be a string or null")
    if not 1 <= len(value) <= limit:
        raise _field_error(f"{key} must be 1 to {limit} characters")
    return _no_nul(value, key)


def _parse_message(data: dict[str, Any], max_length: int) -> SendMessage:
    content = data.get("content")
    if not isinstance(content, str):
        raise _field_error("content must be a string")
    if not content.strip():
        raise ProtocolError(wire.EMPTY_MESSAGE)
    if len(content) > max_length:
        raise ProtocolError(wire.MESSAGE_TOO_LONG, f"at most {max_length} characters")
    return SendMessage(
        content=_no_nul(content, "content"),
        thread_id=_optional_short_str(data, "threadId", MAX_THREAD_ID_LENGTH),
        client_msg_id=_optional_short_str(data, "clientMsgId", MAX_CLIENT_MSG_ID_LENGTH),
    )


def _parse_typing(data: dict[str, Any]) -> SetTyping:
    value = data.get("isTyping")
    if not isinstance(value, bool):
        raise _field_error("isTyping must be a boolean")
    return SetTyping(is_typing=value)


def _parse_presence(data: dict[str, Any]) -> SetPresence:
    status = data.get("status")
    if not isinstance(status, str) or status not in wire.PRESENCE_STATUSES:
        allowed = ", ".join(sorted(wire.PRESENCE_STATUSES))
        raise _field_error(f"status must be one of {allowed}")
    return SetPresence(status=status)


def _seq(data: dict[str, Any], key: str, *, minimum: int = 0) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    # bool is an int in Python; a client sending `true` made a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "non-negative" if minimum == 0 else "positive" if minimum == 1 else f">= {minimum}"
        raise _field_error(f"{key} must be a {kind} integer")
    if value > MAX_SEQ:
        raise _field_error(f"{key} is out of range")
    return value


def _parse_sync(data: dict[str, Any]) -> Sync:
    after_seq = _seq(data, "afterSeq")
    after_id = data.get("afterMessageId")
    if after_seq is not None and after_id is not None:
        raise _field_error("give afterSeq or afterMessageId, not both")
    if after_seq is not None:
        return Sync(after_seq=after_seq)
    if after_id is not None:
        if not isinstance(after_id, str) or not 1 <= len(after_id) <= MAX_MESSAGE_ID_LENGTH:
            raise _field_error(f"afterMessageId must be a string of 1 to {MAX_MESSAGE_ID_LENGTH}")
        return Sync(after_message_id=_no_nul(after_id, "afterMessageId"))
    raise _field_error("sync needs afterSeq or afterMessageId")


def _parse_history(data: dict[str, Any]) -> History:
    limit = _seq(data, "limit", minimum=1)
    if limit is not None and limit > MAX_HISTORY_LIMIT:
        raise _field_error(f"limit must be 1 to {MAX_HISTORY_LIMIT}")
    return History(
        before_seq=_seq(data, "beforeSeq", minimum=1),
        limit=DEFAULT_HISTORY_LIMIT if limit is None else limit,
        thread_id=_optional_short_str(data, "threadId", MAX_THREAD_ID_LENGTH),
    )


def _parse_read(data: dict[str, Any]) -> MarkRead:
    seq = _seq(data, "seq", minimum=1)
    if seq is None:
        raise _field_error("read needs seq")
    return MarkRead(seq=seq)


def _channel(data: dict[str, Any]) -> str:
    channel_id = data.get("channelId")
    if channel_id is None:
        raise _field_error("channelId is required")
    if not valid_channel_id(channel_id):
        raise _field_error("channelId is not a valid channel id")
    assert isinstance(channel_id, str)
    return channel_id


def parse_frame(
    text: str | bytes, *, max_message_length: int, multiplexed: bool
) -> tuple[str | None, ClientFrame]:
    """Parse one client text frame into (channel id, frame).

    The channel id is None for ``ping`` and on the v1 endpoint. Raises
    ``ProtocolError`` when the frame is refused."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError(wire.INVALID_FORMAT) from None
    if not isinstance(data, dict):
        raise ProtocolError(wire.INVALID_FORMAT)
    kind = data.get("type")
    if kind == "ping":
        return None, Ping()
    if not isinstance(kind, str):
        raise ProtocolError(wire.INVALID_FORMAT, "type must be a string")
    parser = _PARSERS.get(kind)
    if parser is None or (kind in _MULTIPLEXED_ONLY and not multiplexed):
        raise ProtocolError(wire.UNKNOWN_TYPE)
    channel_id = _channel(data) if multiplexed else None
    try:
        return channel_id, parser(data, max_message_length)
    except ProtocolError as exc:
        exc.channel_id = channel_id
        raise


def parse_client_frame(text: str | bytes, *, max_message_length: int) -> ClientFrame:
    """Parse one frame of the v1 endpoint (one channel per socket)."""
    return parse_frame(text, max_message_length=max_message_length, multiplexed=False)[1]


_PARSERS: dict[str, Any] = {
    "message": _parse_message,
    "typing": lambda data, _: _parse_typing(data),
    "presence": lambda data, _: _parse_presence(data),
    "sync": lambda data, _: _parse_sync(data),
    "subscribe": lambda data, _: Subscribe(after_seq=_seq(data, "afterSeq")),
    "unsubscribe": lambda data, _: Unsubscribe(),
    "history": lambda data, _: _parse_history(data),
    "read": lambda data, _: _parse_read(data),
}
_MULTIPLEXED_ONLY = frozenset({"subscribe", "unsubscribe"})


def frame_type(frame: ClientFrame) -> str:
    """The wire name of a parsed frame, for metrics."""
    match frame:
        case SendMessage():
            return "message"
        case SetTyping():
            return "typing"
        case SetPresence():
            return "presence"
        case Sync():
            return "sync"
        case Ping():
            return "ping"
        case Subscribe():
            return "subscribe"
        case Unsubscribe():
            return "unsubscribe"
        case History():
            return "history"
        case MarkRead():
            return "read"
