"""Client-side protocol adapters of the load generator, one per system.

Each adapter knows the WebSocket URL of a channel, the headers of a
connection (Waddle: a JWT), what to send when the socket opens, how to
recognise the frames the benchmark cares about (a chat message, the
"ready" frame that ends a connect, an ack, ``sync_complete``) and how to
encode a chat message. Recognition is by byte prefix, so a delivery costs
one ``startswith`` and one ``find`` in the receiver, not a JSON parse.

* ``waddle``: Waddle's v1 JSON frames, ``Authorization: Bearer <jwt>``.
* ``floor``: the same frames, no authentication.
* ``channels``: the same frames (the Django Channels peer speaks them).
* ``socketio``: Engine.IO v4 / Socket.IO v5 spoken directly over picows
  (``0`` open, ``40{auth}`` namespace connect, ``42[event, data]`` events,
  ``2``/``3`` ping/pong), so its clients cost the load generator the same as
  the others; python-socketio's own ``AsyncClient`` (aiohttp based) would cap
  the load generator far below the server's limits.

The content of every benchmark message starts with ``bench:<index 9>:<send
time ns 19>:`` and is padded with ``x`` to the configured size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import jwt
import orjson

MARK = b'"bench:'
IDX_OFFSET = len(MARK)
IDX_DIGITS = 9
NS_OFFSET = IDX_OFFSET + IDX_DIGITS + 1
NS_DIGITS = 19


def bench_content(index: int, size: int, now_ns: int | None = None) -> str:
    """The content of benchmark message ``index`` stamped with its send time."""
    stamp = time.time_ns() if now_ns is None else now_ns
    head = f"bench:{index:0{IDX_DIGITS}d}:{stamp:0{NS_DIGITS}d}:"
    return head + "x" * max(0, size - len(head))


def parse_stamp(data: bytes) -> tuple[int, int] | None:
    """(index, send time ns) of the benchmark message inside ``data``, if any."""
    p = data.find(MARK)
    if p < 0:
        return None
    return (
        int(data[p + IDX_OFFSET : p + IDX_OFFSET + IDX_DIGITS]),
        int(data[p + NS_OFFSET : p + NS_OFFSET + NS_DIGITS]),
    )


class Sink(Protocol):
    """What an adapter may do on an open socket (the load generator's client)."""

    def send_text(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    path: str  # URL path template with {channel}
    message_prefix: bytes
    ready_prefix: bytes
    ack_prefix: bytes
    sync_complete_prefix: bytes
    needs_token: bool = False

    def url(self, base: str, channel: str) -> str:
        return base + self.path.format(channel=channel)

    def headers(self, user: str, secret: str | None) -> list[tuple[str, str]]:
        if not self.needs_token:
            return []
        if secret is None:
            raise ValueError(f"{self.name} needs a JWT secret")
        return [("Authorization", "Bearer " + mint_token(secret, user))]

    def encode_message(self, content: str) -> bytes:
        return orjson.dumps({"type": "message", "content": content})

    def encode_sync(self, after_seq: int) -> bytes:
        return orjson.dumps({"type": "sync", "afterSeq": after_seq})

    def on_other(self, data: bytes, sink: Sink, channel: str) -> None:
        """A frame that is none of the recognised ones (Socket.IO answers pings here)."""


@dataclass(frozen=True, slots=True)
class SocketIOAdapter(Adapter):
    def encode_message(self, content: str) -> bytes:
        return b'42["message",' + orjson.dumps({"content": content}) + b"]"

    def encode_sync(self, after_seq: int) -> bytes:
        raise NotImplementedError("the Socket.IO peer has no replay")

    def on_other(self, data: bytes, sink: Sink, channel: str) -> None:
        if data == b"2":
            sink.send_text(b"3")  # Engine.IO ping -> pong
        elif data[:1] == b"0":
            # Engine.IO open: connect to the default namespace, naming the room.
            sink.send_text(b"40" + orjson.dumps({"channel": channel}))


def mint_token(secret: str, user: str, ttl: float = 6 * 3600) -> str:
    body = {
        "sub": user,
        "username": user,
        "permissions": ["read", "write"],
        "exp": int(time.time() + ttl),
    }
    return jwt.encode(body, secret, algorithm="HS256")


_JSON = {
    "path": "/channel/{channel}/websocket",
    "message_prefix": b'{"type":"message"',
    "ready_prefix": b'{"type":"initial_state"',
    "ack_prefix": b'{"type":"ack"',
    "sync_complete_prefix": b'{"type":"sync_complete"',
}

ADAPTERS: dict[str, Adapter] = {
    "waddle": Adapter(name="waddle", needs_token=True, **_JSON),  # type: ignore[arg-type]
    "floor": Adapter(name="floor", **_JSON),  # type: ignore[arg-type]
    "channels": Adapter(name="channels", **_JSON),  # type: ignore[arg-type]
    "socketio": SocketIOAdapter(
        name="socketio",
        path="/socket.io/?EIO=4&transport=websocket&channel={channel}",
        message_prefix=b'42["message"',
        ready_prefix=b'42["initial_state"',
        ack_prefix=b'42["ack"',
        sync_complete_prefix=b"\x00never",
    ),
}
