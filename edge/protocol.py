"""The client-to-server half of the v1 wire protocol, with no I/O.

``parse_client_frame`` turns the text of one WebSocket frame into one of a
closed set of frozen dataclasses, or raises ``ProtocolError`` carrying the
``ErrorKind`` (and detail) the client is told. Everything a client can send
is validated here: JSON shape, frame type, every field's type and range.
Authorisation (``write``) and sequencing belong to the channel owner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from waddle_common import wire

MAX_THREAD_ID_LENGTH = 128
MAX_CLIENT_MSG_ID_LENGTH = 128
MAX_MESSAGE_ID_LENGTH = 128


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


ClientFrame = SendMessage | SetTyping | SetPresence | Sync | Ping


class ProtocolError(Exception):
    """A frame the server refuses; the connection stays open."""

    def __init__(self, kind: wire.ErrorKind, detail: str | None = None) -> None:
        super().__init__(f"{kind.code}: {detail}" if detail else kind.code)
        self.kind = kind
        self.detail = detail

    def frame(self, **extra: Any) -> bytes:
        return wire.error_frame(self.kind, self.detail, **extra)


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


def _parse_sync(data: dict[str, Any]) -> Sync:
    after_seq = data.get("afterSeq")
    after_id = data.get("afterMessageId")
    if after_seq is not None and after_id is not None:
        raise _field_error("give afterSeq or afterMessageId, not both")
    if after_seq is not None:
        # bool is an int in Python; a client sending `true` made a mistake.
        if not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < 0:
            raise _field_error("afterSeq must be a non-negative integer")
        if after_seq >= 2**63:
            raise _field_error("afterSeq is out of range")
        return Sync(after_seq=after_seq)
    if after_id is not None:
        if not isinstance(after_id, str) or not 1 <= len(after_id) <= MAX_MESSAGE_ID_LENGTH:
            raise _field_error(f"afterMessageId must be a string of 1 to {MAX_MESSAGE_ID_LENGTH}")
        return Sync(after_message_id=_no_nul(after_id, "afterMessageId"))
    raise _field_error("sync needs afterSeq or afterMessageId")


def parse_client_frame(text: str | bytes, *, max_message_length: int) -> ClientFrame:
    """Parse one client text frame; raise ``ProtocolError`` when it is refused."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError(wire.INVALID_FORMAT) from None
    if not isinstance(data, dict):
        raise ProtocolError(wire.INVALID_FORMAT)
    kind = data.get("type")
    match kind:
        case "message":
            return _parse_message(data, max_message_length)
        case "typing":
            return _parse_typing(data)
        case "presence":
            return _parse_presence(data)
        case "sync":
            return _parse_sync(data)
        case "ping":
            return Ping()
        case str():
            raise ProtocolError(wire.UNKNOWN_TYPE)
        case _:
            raise ProtocolError(wire.INVALID_FORMAT, "type must be a string")


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
