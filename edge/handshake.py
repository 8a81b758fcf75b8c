"""The edge's HTTP server: bounded handshakes and strict WebSocket framing.

A connection is *pending* from the moment it is accepted (or from the end
of its previous request, for a kept-alive HTTP connection) until a
complete request reaches a handler. ``PendingHandshakes`` bounds both how
long and how many:

* **how long**: a connection still pending ``timeout`` seconds after it
  started waiting is closed (``WADDLE_HANDSHAKE_TIMEOUT_SECONDS``). All
  pending connections share one timer, set for the oldest of them.
* **how many**: pending connections count toward
  ``WADDLE_EDGE_MAX_CONNECTIONS`` together with the open WebSockets. When a
  new connection finds the edge full, the *oldest* pending connection is
  closed to make room (a slow sender cannot starve fast ones: an honest
  client sends its request at once and leaves the pending set within a
  round trip). A small reserve (1% of the cap, at least one) stays open
  even when every slot holds a WebSocket, so health probes still reach
  the edge and surplus clients still get their ``503 Edge at capacity``.

Once upgraded, a WebSocket costs nothing here: it is no longer in the set
and no timer refers to it.

aiohttp has no option for any of this (its keep-alive timer is per
connection and counts nothing), so the hooks are subclasses of its public
server classes, with no patching: ``EdgeRunner`` (a ``web.AppRunner``)
overrides ``_make_server``, the one method ``BaseRunner`` leaves to its
subclasses, to build an ``EdgeServer`` (a ``web.Server``: the protocol
factory, whose request handler it wraps to see a request reach the
application), which makes an ``EdgeRequestHandler`` (a
``web.RequestHandler``) per connection. That class overrides the protocol
callbacks (``connection_made``/``connection_lost``) and ``handle_error`` (a
request the parser refused gets a 400 and one info log line that quotes
nothing of it: a header value could be a token), and adds ``detach``: an
accepted WebSocket upgrade hands the transport to the edge
(``edge.upgraded``), and aiohttp forgets the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_request import BaseRequest

log = logging.getLogger("edge.http")

TIMED_OUT = "handshake_timeout"
DISPLACED = "handshake_displaced"


class Closable(Protocol):
    def force_close(self) -> None: ...


class PendingHandshakes:
    """Connections waiting for a complete request, oldest first."""

    def __init__(
        self,
        *,
        timeout: float,
        max_connections: int,
        established: Callable[[], int],
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self.timeout = timeout
        self.max_connections = max_connections
        self.reserve = max(1, max_connections // 100)
        self._established = established
        self._loop = loop
        self._on_close = on_close
        self._deadlines: OrderedDict[Closable, float] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, conn: object) -> bool:
        return conn in self._deadlines

    def room(self) -> int:
        """How many connections may be pending at once right now."""
        return max(self.max_connections - self._established(), self.reserve)

    def wait(self, conn: Closable) -> None:
        """``conn`` starts waiting for a request (just accepted, or done with one)."""
        self._deadlines.pop(conn, None)
        if self._closed:
            return
        room = self.room()
        while len(self._deadlines) >= room:
            oldest, _ = self._deadlines.popitem(last=False)
            self._close(oldest, DISPLACED)
        deadline = self._loop.time() + self.timeout
        self._deadlines[conn] = deadline
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)

    def done(self, conn: Closable) -> None:
        """``conn`` reached a handler, or closed."""
        self._deadlines.pop(conn, None)

    def close(self) -> None:
        """Stop the timer (the server is shutting down and closes everything)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        while self._deadlines:
            conn, deadline = next(iter(self._deadlines.items()))
            if deadline > now:
                self._timer = self._loop.call_at(deadline, self._expire)
                return
            del self._deadlines[conn]
            self._close(conn, TIMED_OUT)

    def _close(self, conn: Closable, reason: str) -> None:
        log.debug("closing pending connection", extra={"reason": reason})
        conn.force_close()
        if self._on_close is not None:
            self._on_close(reason)


def describe_bad_request(exc: BaseException) -> str:
    """What was wrong with a request the HTTP parser refused, in a few words
    that quote nothing of it."""
    match exc:
        case LineTooLong():
            return "line too long"
        case BadHttpMethod():
            return "bad method"
        case BadStatusLine():
            return "bad request line"
        case InvalidHeader():
            return "invalid header"
        case InvalidURLError():
            return "invalid URL"
    return "malformed request"


class EdgeRequestHandler(web.RequestHandler):
    """aiohttp's HTTP protocol, one per connection, with the edge's checks."""

    __slots__ = ("_detached", "_handshakes")

    def __init__(
        self, manager: EdgeServer, *, handshakes: PendingHandshakes, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._handshakes = handshakes
        self._detached = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._handshakes.wait(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._handshakes.done(self)
        super().connection_lost(exc)

    def request_started(self) -> None:
        self._handshakes.done(self)

    def request_finished(self) -> None:
        # Another request may follow on this connection, unless it was
        # upgraded (and is no longer aiohttp's).
        if not self._detached and self.transport is not None and not self.transport.is_closing():
            self._handshakes.wait(self)

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Give up the connection for an accepted WebSocket upgrade: return
        its transport and the bytes that came after the request, and keep
        nothing. The server stops counting it, nothing here writes to it
        again, and the handler's response (``edge.upgraded.taken_over``)
        writes nothing."""
        transport = self.transport
        if transport is None or self._detached:
            raise ConnectionResetError("connection closed before the upgrade")
        self._detached = True
        tail, self._message_tail = self._message_tail, b""
        # As if the connection were gone, but without closing it: the server
        # forgets it and the parser and keep-alive timer go.
        self.transport = None
        self.connection_lost(None)
        return transport, tail

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # The parser refused the request: nothing of it is logged or echoed.
        what = describe_bad_request(exc)
        log.info("bad request", extra={"remote": request.remote, "status": status, "error": what})
        response = web.Response(status=status, text=f"Bad request: {what}\n")
        response.force_close()
        return response


class EdgeServer(web.Server):
    """The protocol factory: an ``EdgeRequestHandler`` per connection."""

    def __init__(
        self,
        handler: Callable[[BaseRequest], Any],
        *,
        handshakes: PendingHandshakes,
        **kwargs: Any,
    ) -> None:
        super().__init__(self._handle, **kwargs)
        self._app_handler = handler
        self.handshakes = handshakes

    def __call__(self) -> EdgeRequestHandler:
        # As web.Server.__call__ (``_kwargs``: the handler arguments it keeps).
        return EdgeRequestHandler(self, loop=self._loop, handshakes=self.handshakes, **self._kwargs)

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        if isinstance(protocol, EdgeRequestHandler):
            protocol.request_started()
        try:
            response: web.StreamResponse = await self._app_handler(request)
            return response
        finally:
            if isinstance(protocol, EdgeRequestHandler):
                protocol.request_finished()

    def pre_shutdown(self) -> None:
        self.handshakes.close()
        super().pre_shutdown()


class EdgeRunner(web.AppRunner):
    """An ``AppRunner`` whose server is an ``EdgeServer``.

    ``handshakes`` is called once the application has started (its
    cleanup contexts have run), so it can read what they set up."""

    __slots__ = ("_make_handshakes",)

    def __init__(
        self,
        app: web.Application,
        *,
        handshakes: Callable[[web.Application], PendingHandshakes],
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._make_handshakes = handshakes

    async def _make_server(self) -> web.Server:
        # The stock server: runs the application's startup and knows its
        # request handler and request factory.
        stock = await super()._make_server()
        return EdgeServer(
            stock.request_handler,
            handshakes=self._make_handshakes(self.app),
            request_factory=stock.request_factory,
            handler_cancellation=stock.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **self._kwargs,
        )
