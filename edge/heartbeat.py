"""WebSocket heartbeats for a whole edge: one timer, not one per socket.

A timer per socket (aiohttp's ``heartbeat=``, re-armed as frames arrive)
would make every idle connection cost one. Here one timer per edge
writes a heartbeat frame to every open WebSocket once each ``interval``
seconds. The sockets are spread over ``interval / STEP`` buckets (by a hash
of the socket, so nothing is kept to find a socket's bucket) and each tick,
``STEP`` seconds apart, beats one bucket, a slice of it per loop turn. A
round of 10,000 sockets at once kept the edge busy for a fifth of a second
and woke every client at the same moment (a load generator holding all of
them stalled for that long, 300 ms and more of latency for whatever it was
measuring); spread, each tick writes a thirtieth of them.

The frame is an unsolicited pong (RFC 6455 5.5.3: "a unidirectional
heartbeat", which no client answers), not a ping. A ping's answer woke
the socket's handler on every round: 57 us of the edge's CPU per socket and
round with it, 22 us without (4,000 idle sockets,
``bench/profiles/heartbeat/idle-edge.txt``), and the edge has no use for
it. What the heartbeat is for holds without one:

* keeping intermediaries (proxies, load balancers) from closing a quiet
  connection: they see data every interval, and a NAT in front of the client
  sees the client's TCP acknowledgement of it go out;
* finding a peer that has vanished (a laptop lid closed, a phone out of
  coverage): each socket gets ``TCP_USER_TIMEOUT`` of two intervals, so the
  kernel cuts a connection whose data (heartbeats included) stays
  unacknowledged that long, and its handler ends as on any disconnect. Where
  the option does not exist (not Linux), dead peers are found by TCP's own
  retransmission limit.

Browsers and WebSocket libraries ignore unsolicited pongs; the edge still
answers a client's own pings. Nothing is kept per heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from edge.runtime import SETTINGS
from edge.upgraded import EdgeSocket

log = logging.getLogger("edge.heartbeat")

# FIN + opcode 0xA (pong), unmasked (server to client), empty payload.
HEARTBEAT_FRAME = b"\x8a\x00"


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


STEP = 1.0
"""Seconds between the timer's ticks (each beats one bucket)."""


class Heartbeat:
    """Writes a heartbeat to every registered WebSocket once each ``interval``
    s, from one timer that beats one bucket of them every ``step`` s."""

    def __init__(self, interval: float, *, step: float = STEP, slice_size: int = 1000) -> None:
        self.interval = interval
        self.slots = max(1, round(interval / step))
        self.step = interval / self.slots
        self.slice_size = slice_size
        self._buckets: list[dict[EdgeSocket, asyncio.Transport]] = [{} for _ in range(self.slots)]
        self._next = 0  # the bucket the next tick beats
        self._timer: asyncio.TimerHandle | None = None
        self.beats = 0  # frames written, for tests and curiosity

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets)

    def _bucket(self, sock: EdgeSocket) -> dict[EdgeSocket, asyncio.Transport]:
        # Fibonacci hashing of the identity: objects allocated at a fixed
        # stride would otherwise fill some buckets and leave others empty.
        return self._buckets[((hash(sock) * 0x9E3779B97F4A7C15) >> 32) % self.slots]

    def add(self, sock: EdgeSocket) -> None:
        transport = sock.transport
        set_user_timeout(transport, 2 * self.interval)
        self._bucket(sock)[sock] = transport
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.step, self._tick)

    def discard(self, sock: EdgeSocket) -> None:
        self._bucket(sock).pop(sock, None)

    def _tick(self) -> None:
        self._timer = None
        if not any(self._buckets):
            return  # the next add() starts the timer again
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.step, self._tick)
        bucket = self._buckets[self._next]
        self._next = (self._next + 1) % self.slots
        if bucket:
            self._beat(list(bucket.items()), 0)

    def _beat(self, sockets: list[tuple[EdgeSocket, asyncio.Transport]], start: int) -> None:
        end = start + self.slice_size
        for sock, transport in sockets[start:end]:
            # A socket that is closing must not get a frame after its close frame.
            if sock.open and not transport.is_closing():
                transport.write(HEARTBEAT_FRAME)
                self.beats += 1
        if end < len(sockets):
            asyncio.get_running_loop().call_soon(self._beat, sockets, end)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for bucket in self._buckets:
            bucket.clear()


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
