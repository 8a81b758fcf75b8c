"""An upgraded WebSocket, owned by the edge from the 101 on.

aiohttp serves the HTTP request: admission, the token, the join. Once the
edge accepts the upgrade, ``take_over`` writes the 101, takes the TCP
transport from aiohttp's request handler (``EdgeRequestHandler.detach``)
and makes an ``EdgeSocket`` its protocol. From then on nothing of aiohttp
is left for that connection: no request, no handler task, no frame queue.
An idle socket is its transport, this object and the frame parser's state;
frames are parsed and handled as they arrive (``data_received``), with no
task or timer per connection (the edge's one ``Heartbeat`` beats every
socket; a closing socket arms one timer, for its close handshake).

The RFC 6455 framing is the ``websockets`` library's Sans-I/O protocol
(state OPEN, server side): it refuses unmasked client frames and bad
opcodes (1002), bounds a message across its fragments (1009), answers
pings and runs the close handshake. This module adds what that layer
leaves to its caller: joining fragments, checking that text is UTF-8
(1007), writing what the protocol has to send, closing the TCP connection
when it says so, and flow control for writers that wait for a slow peer.

What a socket means is a ``Session``'s business (``edge.app`` for v1,
``edge.mux`` for v1.1): it gets each complete message and, once, the end.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Callable
from typing import Protocol

from aiohttp import hdrs, web
from websockets.exceptions import ProtocolError
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Side
from websockets.protocol import Protocol as FrameProtocol

from edge.handshake import EdgeRequestHandler

log = logging.getLogger("edge.websocket")

# RFC 6455 4.2.2: the GUID the client's key is hashed with.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# A peer that does not finish a close handshake (or take the close frame)
# in this long is cut off.
CLOSE_TIMEOUT = 5.0
# websockets' own per-connection log lines ("connection closed") would be
# one per socket; the edge logs what matters itself.
_FRAMING_LOG = logging.getLogger("edge.websocket.framing")
_FRAMING_LOG.setLevel(logging.WARNING)
_MAX_REASON_BYTES = 123  # RFC 6455 5.5: a control frame's payload is at most 125 bytes


class Session(Protocol):
    """What a socket is for: the v1 channel or the v1.1 subscriptions."""

    def on_text(self, text: str) -> bool:
        """A complete text message; False ends the socket (the session has
        closed it with its code, or it closes with 1000)."""
        ...

    def on_binary(self) -> bool:
        """A complete binary message (the protocol has none); as ``on_text``."""
        ...

    def on_closed(self, code: int | None) -> None:
        """The TCP connection is gone; ``code`` is the close code received, if any."""
        ...


SessionFactory = Callable[["EdgeSocket"], Session]


class EdgeSocket(asyncio.Protocol):
    """The protocol of one upgraded connection's transport."""

    __slots__ = (
        "_close_timer",
        "_ended",
        "_ended_waiter",
        "_fragments",
        "_fragments_text",
        "_frames",
        "_stopped",
        "_writable",
        "session",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        max_size: int,
        session: SessionFactory,
    ) -> None:
        self.transport = transport
        self._frames = FrameProtocol(
            Side.SERVER, state=OPEN, max_size=max_size, logger=_FRAMING_LOG
        )
        self._fragments: list[bytes] | None = None  # a message still arriving
        self._fragments_text = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused
        self._ended_waiter: asyncio.Future[None] | None = None  # made by wait_closed()
        self._ended = False
        self._stopped = False  # the edge sent its close: nothing more is served
        self.session = session(self)

    # -- state ------------------------------------------------------------

    @property
    def open(self) -> bool:
        """True until a close frame went either way or the connection ended."""
        return not self._ended and self._frames.state is OPEN

    @property
    def closed(self) -> bool:
        return not self.open

    @property
    def close_code(self) -> int | None:
        """The code of the peer's close frame, if one came."""
        received = self._frames.close_rcvd
        return None if received is None else int(received.code)

    # -- closing ------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake with ``code`` (what was written before
        goes out first); the peer has ``CLOSE_TIMEOUT`` s to finish it."""
        self._stopped = True
        if not self.open:
            return
        raw = reason.encode()[:_MAX_REASON_BYTES]
        self._frames.send_close(code, raw.decode(errors="ignore"))
        self._write_pending()

    # -- asyncio.Protocol ---------------------------------------------------

    def data_received(self, data: bytes) -> None:
        frames = self._frames
        frames.receive_data(data)
        for frame in frames.events_received():
            if not isinstance(frame, Frame):
                continue  # (the server side of an open connection has only frames)
            if self._stopped:
                break  # the edge closed: nothing after that is served
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if not frame.fin:
                    self._fragments = [bytes(frame.data)]
                    self._fragments_text = opcode is Opcode.TEXT
                    continue
                self._message(opcode is Opcode.TEXT, bytes(frame.data))
            elif opcode is Opcode.CONT:
                parts = self._fragments
                if parts is None:  # the protocol refuses this; kept for the type
                    continue
                parts.append(bytes(frame.data))
                if frame.fin:
                    self._fragments = None
                    self._message(self._fragments_text, b"".join(parts))
        if isinstance(frames.parser_exc, ProtocolError) and not self._ended:
            log.info("websocket protocol error", extra={"error": str(frames.parser_exc)})
        self._write_pending()

    def feed(self, data: bytes) -> None:
        """Serve what arrived with the upgrade request, once the session is ready."""
        if data:
            self.data_received(data)

    def eof_received(self) -> bool:
        self._frames.receive_eof()
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._wake_writers(ConnectionError("connection closed"))
        self._fragments = None
        if self._ended_waiter is not None and not self._ended_waiter.done():
            self._ended_waiter.set_result(None)
        self.session.on_closed(self.close_code)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writers(None)

    async def drained(self) -> None:
        """Return once the peer has taken what was written down to the
        transport's low-water mark; raise ``ConnectionError`` if it is gone."""
        if self._ended or self.transport.is_closing():
            raise ConnectionError("connection closed")
        if self._writable is not None:
            await asyncio.shield(self._writable)

    async def wait_closed(self) -> None:
        """Return once the TCP connection is gone."""
        if self._ended:
            return
        if self._ended_waiter is None:
            self._ended_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._ended_waiter)

    # -- internals ----------------------------------------------------------

    def _message(self, is_text: bool, data: bytes) -> None:
        if not is_text:
            keep = self.session.on_binary()
        else:
            try:
                text = data.decode()
            except UnicodeDecodeError as exc:
                self._stopped = True
                self._frames.fail(1007, f"invalid UTF-8 at position {exc.start}")
                return
            keep = self.session.on_text(text)
        if not keep:
            self.close(1000)

    def _write_pending(self) -> None:
        frames = self._frames
        transport = self.transport
        for chunk in frames.data_to_send():
            if chunk:
                if not transport.is_closing():
                    transport.write(chunk)
            else:
                # The protocol's end of stream: a server closes the TCP
                # connection once the close handshake is over (or failed).
                transport.close()
        if frames.close_expected() and self._close_timer is None and not self._ended:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if not self._ended:
            log.info("close handshake timed out; connection aborted")
            self.transport.abort()

    def _wake_writers(self, exc: BaseException | None) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
                waiter.exception()  # nobody may be waiting: not an unretrieved error


def accept_key(key: str) -> str:
    """RFC 6455 4.2.2: ``Sec-WebSocket-Accept`` for a client's key."""
    return base64.b64encode(hashlib.sha1(key.encode() + _ACCEPT_GUID).digest()).decode()


async def checked(request: web.Request, protocols: tuple[str, ...]) -> str | None:
    """Check the upgrade request as aiohttp does (a bad one raises its
    ``HTTPBadRequest``, with the same words); return the subprotocol chosen."""
    probe = web.WebSocketResponse(protocols=protocols)
    ready = probe.can_prepare(request)
    if not ready.ok:
        await probe.prepare(request)  # raises the refusal
        raise web.HTTPBadRequest(text="Not a WebSocket upgrade\n")  # (prepare always raises)
    return ready.protocol


def take_over(
    request: web.Request, subprotocol: str | None, *, max_size: int, session: SessionFactory
) -> tuple[EdgeSocket, bytes]:
    """Write the 101 and make the connection the edge's: an ``EdgeSocket``
    serving ``session(socket)``, and the bytes the client sent after its
    request. The handler registers the socket, hands those to ``feed``
    (frames are served only from then on) and returns ``taken_over()``."""
    handler = request.protocol
    if not isinstance(handler, EdgeRequestHandler):
        raise TypeError("the edge's sockets are served by EdgeRequestHandler")
    head = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(request.headers[hdrs.SEC_WEBSOCKET_KEY])}",
    ]
    if subprotocol is not None:
        head.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    transport, tail = handler.detach()
    transport.write(("\r\n".join(head) + "\r\n\r\n").encode())
    sock = EdgeSocket(transport, max_size=max_size, session=session)
    transport.set_protocol(sock)
    return sock, tail


class _TakenOver(web.StreamResponse):
    """What a handler returns once the edge owns its socket: aiohttp writes
    nothing (the transport is no longer its own) and keeps nothing."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def taken_over() -> web.StreamResponse:
    return _TakenOver(status=101)
