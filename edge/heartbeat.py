"""WebSocket heartbeats for a whole edge: one timer, not one per socket.

aiohttp's ``heartbeat=`` arms a timer per socket and re-arms it as frames
arrive, so every idle connection costs a timer. Here one timer per edge
writes a ping frame to every open WebSocket each ``interval`` seconds, a
slice of sockets per loop turn so a big edge does not stall.

Keeping intermediaries (NATs, proxies, load balancers) from closing a quiet
connection is what the pings are for. A peer that has vanished (a laptop
lid closed, a phone out of coverage) never acknowledges them: each socket
gets ``TCP_USER_TIMEOUT`` of two intervals, so the kernel cuts a connection
whose data (pings included) stays unacknowledged that long, and its handler
ends as on any disconnect. Nothing is kept per ping; aiohttp answers the
client's pings and swallows its pongs. Where the option does not exist
(not Linux), pings still go out and dead peers are found by TCP's own
retransmission limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from edge.runtime import SETTINGS

log = logging.getLogger("edge.heartbeat")

# FIN + opcode 0x9 (ping), unmasked (server to client), empty payload.
PING_FRAME = b"\x89\x00"


def set_user_timeout(transport: asyncio.BaseTransport | None, seconds: float) -> bool:
    """Have the kernel drop the connection when sent data stays unacknowledged
    for ``seconds``; False when the platform or transport cannot."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if option is None or sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(seconds * 1000)))
    except OSError:
        return False
    return True


class Heartbeat:
    """Pings every registered WebSocket each ``interval`` seconds from one timer."""

    def __init__(self, interval: float, *, slice_size: int = 1000) -> None:
        self.interval = interval
        self.slice_size = slice_size
        self._sockets: dict[web.WebSocketResponse, asyncio.Transport] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.pings = 0  # frames written, for tests and curiosity

    def __len__(self) -> int:
        return len(self._sockets)

    def add(self, ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
        if transport is None:
            return
        set_user_timeout(transport, 2 * self.interval)
        self._sockets[ws] = transport
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.interval, self._tick)

    def discard(self, ws: web.WebSocketResponse) -> None:
        self._sockets.pop(ws, None)

    def _tick(self) -> None:
        self._timer = None
        if not self._sockets:
            return  # the next add() starts the timer again
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.interval, self._tick)
        self._ping(list(self._sockets.items()), 0)

    def _ping(
        self, sockets: list[tuple[web.WebSocketResponse, asyncio.Transport]], start: int
    ) -> None:
        end = start + self.slice_size
        for ws, transport in sockets[start:end]:
            # A socket that is closing must not get a frame after its close frame.
            if not ws.closed and not transport.is_closing():
                transport.write(PING_FRAME)
                self.pings += 1
        if end < len(sockets):
            asyncio.get_running_loop().call_soon(self._ping, sockets, end)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sockets.clear()


HEARTBEAT = web.AppKey("heartbeat", Heartbeat)


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """The edge's heartbeat, from ``WADDLE_HEARTBEAT_SECONDS``."""
    heartbeat = Heartbeat(app[SETTINGS].heartbeat_seconds)
    app[HEARTBEAT] = heartbeat
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            heartbeat.stop()
