"""Pending handshakes: their deadline, their share of the connection cap,
and the aiohttp hooks (``EdgeRunner``) on a real in-process server, over
raw TCP: timeouts, displacement, kept-alive requests, malformed requests
and unmasked frames; and that an upgraded socket leaves no task and no
request handler behind."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import os
import struct
from collections.abc import Callable

import pytest
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    LineTooLong,
)

from edge.handshake import (
    DISPLACED,
    TIMED_OUT,
    EdgeRequestHandler,
    PendingHandshakes,
    describe_bad_request,
)
from edge.upgraded import EdgeSocket
from edge.wsframe import text_frame
from tests.edge.sockets import serve, upgrade_route

# -- PendingHandshakes -------------------------------------------------------------


class Conn:
    """A connection as the bookkeeping sees it: something to close."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = asyncio.Event()

    def force_close(self) -> None:
        self.closed.set()

    def __repr__(self) -> str:
        return self.name


def pending(
    *, timeout: float = 60, cap: int = 4, established: Callable[[], int] = lambda: 0
) -> tuple[PendingHandshakes, list[str]]:
    reasons: list[str] = []
    return (
        PendingHandshakes(
            timeout=timeout,
            max_connections=cap,
            established=established,
            loop=asyncio.get_running_loop(),
            on_close=reasons.append,
        ),
        reasons,
    )


async def test_a_full_edge_closes_the_oldest_pending_connection() -> None:
    handshakes, reasons = pending(cap=3)
    conns = [Conn(f"c{i}") for i in range(5)]
    for conn in conns:
        handshakes.wait(conn)
    assert [c.closed.is_set() for c in conns] == [True, True, False, False, False]
    assert reasons == [DISPLACED, DISPLACED]
    assert len(handshakes) == 3
    handshakes.close()


async def test_open_websockets_take_their_share_of_the_cap() -> None:
    established = 0
    handshakes, _ = pending(cap=4, established=lambda: established)
    first, second, third = Conn("first"), Conn("second"), Conn("third")
    handshakes.wait(first)
    handshakes.wait(second)
    established = 3  # three WebSockets opened meanwhile: room for one
    handshakes.wait(third)
    assert first.closed.is_set() and second.closed.is_set() and not third.closed.is_set()
    handshakes.close()


async def test_a_reserve_stays_when_every_slot_is_a_websocket() -> None:
    handshakes, _ = pending(cap=4, established=lambda: 4)
    assert handshakes.room() == handshakes.reserve == 1
    probe, next_probe = Conn("probe"), Conn("next")
    handshakes.wait(probe)
    assert not probe.closed.is_set()
    handshakes.wait(next_probe)
    assert probe.closed.is_set() and not next_probe.closed.is_set()
    handshakes.close()


async def test_reserve_is_a_percent_of_the_cap() -> None:
    handshakes, _ = pending(cap=20000, established=lambda: 20000)
    assert handshakes.room() == 200
    handshakes.close()


async def test_connections_still_pending_at_their_deadline_are_closed() -> None:
    handshakes, reasons = pending(timeout=0.1)
    slow, served = Conn("slow"), Conn("served")
    handshakes.wait(slow)
    handshakes.wait(served)
    handshakes.done(served)
    async with asyncio.timeout(5):
        await slow.closed.wait()
    assert reasons == [TIMED_OUT]
    assert not served.closed.is_set() and len(handshakes) == 0


async def test_waiting_again_restarts_the_deadline_and_the_order() -> None:
    handshakes, _ = pending(timeout=60, cap=2)
    first, second, third = Conn("first"), Conn("second"), Conn("third")
    handshakes.wait(first)
    handshakes.wait(second)
    handshakes.wait(first)  # served a request, waits for the next one
    handshakes.wait(third)
    assert second.closed.is_set() and not first.closed.is_set()
    handshakes.close()


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (LineTooLong(b"Bearer eyJhbGciOi...", 8190), "line too long"),
        (BadHttpMethod("G@T"), "bad method"),
        (BadStatusLine("GET"), "bad request line"),
        (InvalidHeader(b"Bearer eyJ"), "invalid header"),
        (BadHttpMessage("Bad header: eyJ"), "malformed request"),
    ],
)
def test_bad_requests_are_described_without_quoting_them(exc: BaseException, words: str) -> None:
    assert describe_bad_request(exc) == words


# -- the aiohttp hooks, on a real server ---------------------------------------------

TIMEOUT = 0.5


class Echo:
    """Sends every text message back."""

    def __init__(self, sock: EdgeSocket) -> None:
        self.sock = sock

    def on_text(self, text: str) -> bool:
        self.sock.transport.write(text_frame(text.encode()))
        return True

    def on_binary(self) -> bool:
        return True

    def on_closed(self, code: int | None) -> None:
        return None


def server(
    cap: int = 4, timeout: float = TIMEOUT
) -> contextlib.AbstractAsyncContextManager[tuple[int, PendingHandshakes, list[str]]]:
    return serve(upgrade_route(Echo), cap=cap, timeout=timeout)


async def closed(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


async def upgrade(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def text(payload: bytes, *, masked: bool = True) -> bytes:
    if not masked:
        return bytes((0x81, len(payload))) + payload
    key = os.urandom(4)
    return (
        bytes((0x81, 0x80 | len(payload)))
        + key
        + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    )


async def next_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), 5)
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(second & 0x7F), 5)


async def test_a_silent_connection_is_closed_after_the_timeout() -> None:
    async with server() as (port, handshakes, reasons):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        async with asyncio.timeout(TIMEOUT + 5):
            await closed(reader)
        writer.close()
        assert reasons == [TIMED_OUT] and len(handshakes) == 0


async def test_an_upgraded_websocket_is_not_pending_and_outlives_the_timeout() -> None:
    async with server() as (port, handshakes, reasons):
        reader, writer = await upgrade(port)
        assert len(handshakes) == 0
        # Past the handshake timeout (a frame round trip at a time), it still echoes.
        loop = asyncio.get_running_loop()
        until = loop.time() + TIMEOUT * 2
        while loop.time() < until:
            writer.write(text(b"hello"))
            assert await next_frame(reader) == (0x1, b"hello")
        assert reasons == []
        writer.close()


async def test_kept_alive_connection_waits_again_between_requests() -> None:
    async with server() as (port, handshakes, reasons):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"ok\n"
            assert len(handshakes) == 1  # waiting for the next request
        async with asyncio.timeout(TIMEOUT + 5):
            await closed(reader)
        writer.close()
        assert reasons == [TIMED_OUT]


async def test_new_connection_displaces_the_oldest_pending_one() -> None:
    async with server(cap=2, timeout=60) as (port, handshakes, reasons):
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _, writer in conns:
            writer.write(b"GET / HTTP/1.1\r\n")
            await writer.drain()
        newcomer_reader, newcomer = await asyncio.open_connection("127.0.0.1", port)
        newcomer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(newcomer_reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        async with asyncio.timeout(5):
            await closed(conns[0][0])
        assert reasons == [DISPLACED]
        # The second one and the newcomer (kept alive, waiting again).
        assert len(handshakes) == 2
        for _, writer in [*conns, (None, newcomer)]:
            writer.close()


async def test_unmasked_frame_closes_with_1002(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with server() as (port, _handshakes, _reasons):
        reader, writer = await upgrade(port)
        writer.write(text(b"masked") + text(b"unmasked", masked=False) + text(b"later"))
        assert await next_frame(reader) == (0x1, b"masked")
        opcode, payload = await next_frame(reader)
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1002
        async with asyncio.timeout(5):
            await closed(reader)
        writer.close()
    assert any(
        r.getMessage() == "websocket protocol error" and "mask" in r.__dict__["error"]
        for r in caplog.records
    )


async def test_malformed_request_gets_400_and_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJtYWxsb3J5In0." + "s" * 9000
    caplog.set_level(logging.DEBUG)
    async with server() as (port, _handshakes, _reasons):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400" and body == b"Bad request: line too long\n"
    records = [r for r in caplog.records if r.name.startswith(("edge", "aiohttp"))]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.INFO, "bad request")]
    assert records[0].exc_info is None and "eyJ" not in str(records[0].__dict__)


async def test_upgraded_sockets_leave_no_task_and_no_request_handler_behind() -> None:
    """Once upgraded, a socket is its transport and its protocol: no task,
    and aiohttp's request handler for it is gone."""
    async with server() as (port, _handshakes, _reasons):
        await asyncio.sleep(0)
        gc.collect()
        tasks_before = len(asyncio.all_tasks())
        sockets_before = sum(isinstance(o, EdgeSocket) for o in gc.get_objects())
        conns = [await upgrade(port) for _ in range(20)]
        for reader, writer in conns:  # each socket served once, then idle
            writer.write(text(b"ping"))
            assert await next_frame(reader) == (0x1, b"ping")
        gc.collect()
        assert len(asyncio.all_tasks()) == tasks_before
        assert not [o for o in gc.get_objects() if isinstance(o, EdgeRequestHandler)]
        assert sum(isinstance(o, EdgeSocket) for o in gc.get_objects()) == sockets_before + 20
        for _, writer in conns:
            writer.close()
