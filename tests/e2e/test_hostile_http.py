"""Hostile HTTP and WebSocket framing against the real edge, over raw TCP:
slow handshakes, more pending handshakes than the edge has room for, a
newline smuggled into a channel id, over-long headers carrying a token,
malformed requests, and client frames without a mask.

The handshake timeout and the connection cap are set low; every wait is
bounded and waits on the socket (EOF, a frame) or on the edge's metrics
and log, never on the clock alone."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

HANDSHAKE_TIMEOUT = 3.0
CAP = 8
ENV = {
    "WADDLE_HANDSHAKE_TIMEOUT_SECONDS": str(HANDSHAKE_TIMEOUT),
    "WADDLE_EDGE_MAX_CONNECTIONS": str(CAP),
}
# How late after the bound a close may come on a busy test machine.
SLACK = 2.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("hostile-http"), env=ENV) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No idle pooled connections: they would be pending handshakes too.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


def cid() -> str:
    return f"hh-{uuid.uuid4().hex[:8]}"


# -- raw sockets ---------------------------------------------------------------


class Raw:
    """One raw TCP connection to the edge."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = time.monotonic()

    @classmethod
    async def open(cls, stack: Stack) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge_port(), limit=2**20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed_after(self) -> float:
        """Seconds from opening until the edge closed the connection."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        return time.monotonic() - self.opened

    async def response_head(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)

    def close(self) -> None:
        self.writer.close()


def status(head: bytes) -> int:
    """The status code of a response head (HTTP/1.0 or 1.1)."""
    version, code = head.split(b" ", 2)[:2]
    assert version in (b"HTTP/1.0", b"HTTP/1.1"), head
    return int(code)


def upgrade_request(path: str, port: int, *headers: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    n = len(payload)
    assert n < 126
    if not masked:
        return bytes((0x80 | opcode, n)) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | n)) + key + body


async def server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame the edge sent (server frames are never masked)."""
    first, second = await asyncio.wait_for(reader.readexactly(2), 10)
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(n), 10)


async def server_text(reader: asyncio.StreamReader) -> dict[str, Any]:
    opcode, payload = await server_frame(reader)
    assert opcode == 0x1, (opcode, payload)
    frame = orjson.loads(payload)
    assert isinstance(frame, dict)
    return frame


# -- the edge's metrics and log --------------------------------------------------


async def metric(http: aiohttp.ClientSession, stack: Stack, name: str, **labels: str) -> float:
    # The edge closes the connection itself, right after answering: it is
    # gone before the test opens its next one.
    async with http.get(stack.http_url("/metrics"), headers={"Connection": "close"}) as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def refusals(http: aiohttp.ClientSession, stack: Stack, reason: str) -> float:
    return await metric(http, stack, "waddle_edge_refusals_total", reason=reason)


async def settle(http: aiohttp.ClientSession, stack: Stack) -> None:
    """Until the edge holds no WebSocket and no pending connection (those of
    earlier tests: a close reaches the edge a moment after the client's).
    Nothing to wait on but the edge's gauges: read every 20 ms."""
    async with asyncio.timeout(HANDSHAKE_TIMEOUT + SLACK):
        while (  # noqa: ASYNC110
            await metric(http, stack, "waddle_edge_pending_connections")
            or await metric(http, stack, "waddle_edge_connections")
        ):
            await asyncio.sleep(0.02)


class EdgeLog:
    """The edge's log from a point on (the file its output is copied to)."""

    def __init__(self, stack: Stack) -> None:
        self.path: Path = stack.tmp / "edge0.log"
        self.start = self.path.stat().st_size

    def text(self) -> str:
        with self.path.open("rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", "replace")

    def entries(self) -> list[dict[str, Any]]:
        parsed = []
        for line in self.text().splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = {"event": line, "level": "raw"}
            parsed.append(entry if isinstance(entry, dict) else {"event": str(entry)})
        return parsed

    async def wait_for(
        self, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """The entries once ``condition`` holds. The log is a file another
        process writes, flushed line by line: read again every 20 ms."""
        async with asyncio.timeout(timeout):
            while not condition(entries := self.entries()):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        return entries


def assert_no_failure_logged(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        text = orjson.dumps(entry).decode()
        assert "Traceback" not in text and "exc" not in entry, text
        assert entry.get("level") not in ("error", "critical", "raw"), text


def bad_requests(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("event") == "bad request"]


# -- handshakes ------------------------------------------------------------------


async def test_slow_handshakes_are_closed_within_the_bound(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Slowloris: a header line every half second never completes the
    request; each connection is closed once the handshake timeout is up."""
    await settle(http, stack)
    timeouts = await refusals(http, stack, "handshake_timeout")
    port = stack.edge_port()
    conns = [await Raw.open(stack) for _ in range(5)]

    async def trickle(conn: Raw) -> None:
        with contextlib.suppress(ConnectionError):
            await conn.send(f"GET /channel/{cid()}/websocket HTTP/1.1\r\n".encode())
            for i in range(1000):
                await conn.send(f"X-Slow-{i}: {port}\r\n".encode())
                await asyncio.sleep(0.5)  # the attacker's pace, not a wait

    senders = [asyncio.create_task(trickle(c)) for c in conns]
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT + SLACK):
            lifetimes = await asyncio.gather(*(c.closed_after() for c in conns))
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        for c in conns:
            c.close()
    # Sending kept none of them alive past the bound, and none was cut short.
    assert all(HANDSHAKE_TIMEOUT - 0.5 <= t <= HANDSHAKE_TIMEOUT + SLACK for t in lifetimes), (
        lifetimes
    )
    assert await refusals(http, stack, "handshake_timeout") == timeouts + len(conns)


async def test_pending_handshakes_count_toward_the_connection_cap(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """CAP + 3 connections that never finish a request: the 3 oldest are
    closed at once, a real client still gets in (displacing one more), and
    the rest are closed when their time is up; then the edge is free again."""
    await settle(http, stack)
    displaced = await refusals(http, stack, "handshake_displaced")
    timeouts = await refusals(http, stack, "handshake_timeout")
    extra = 3
    conns: list[Raw] = []
    try:
        for _ in range(CAP + extra):
            conns.append(await Raw.open(stack))
            await conns[-1].send(b"GET /healthz HTTP/1.1\r\n")
        # Well before the handshake timeout: the oldest made room.
        async with asyncio.timeout(HANDSHAKE_TIMEOUT / 2):
            await asyncio.gather(*(c.closed_after() for c in conns[:extra]))

        # A real client is not locked out while the edge is full of them.
        client = await WsClient.connect(http, stack.ws_url(cid()), token=stack.token("real"))
        assert (await client.recv())["type"] == "initial_state"
        async with asyncio.timeout(HANDSHAKE_TIMEOUT / 2):
            await conns[extra].closed_after()
        await client.close()

        async with asyncio.timeout(HANDSHAKE_TIMEOUT + SLACK):
            await asyncio.gather(*(c.closed_after() for c in conns[extra + 1 :]))
    finally:
        for c in conns:
            c.close()
    assert await refusals(http, stack, "handshake_displaced") == displaced + extra + 1
    assert await refusals(http, stack, "handshake_timeout") == timeouts + CAP - 1

    # Once they are gone, connecting works as ever.
    await settle(http, stack)
    client = await WsClient.connect(http, stack.ws_url(cid()), token=stack.token("later"))
    assert (await client.recv())["type"] == "initial_state"
    await client.close()


async def test_keep_alive_http_requests_still_work(stack: Stack) -> None:
    """Several requests on one kept-alive connection are each answered; once
    idle, the connection waits for its next request no longer than the bound."""
    conn = await Raw.open(stack)
    try:
        for path in ("/healthz", "/metrics", "/readyz", "/healthz"):
            await conn.send(f"GET {path} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
            head = await conn.response_head()
            assert head.startswith(b"HTTP/1.1 200"), (path, head)
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await asyncio.wait_for(conn.reader.readexactly(length), 10)
        idle_since = time.monotonic()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT + SLACK):
            await conn.closed_after()
        assert time.monotonic() - idle_since >= HANDSHAKE_TIMEOUT - 0.5
    finally:
        conn.close()


# -- channel ids -------------------------------------------------------------------


async def upgrade_status(stack: Stack, channel: str) -> int:
    conn = await Raw.open(stack)
    try:
        await conn.send(
            upgrade_request(
                f"/channel/{channel}/websocket",
                stack.edge_port(),
                f"Authorization: Bearer {stack.token('nl')}",
            )
        )
        return status(await conn.response_head())
    finally:
        conn.close()


@pytest.mark.parametrize("channel", ["abc", "a" * 128], ids=["short", "longest"])
async def test_channel_id_with_trailing_newline_is_refused(stack: Stack, channel: str) -> None:
    """A valid id is accepted; the same id with a newline after it is not
    (``$`` alone would match before that newline)."""
    suffix = uuid.uuid4().hex[:6]
    valid = channel[: 128 - len(suffix)] + suffix
    assert await upgrade_status(stack, valid) == 101
    assert await upgrade_status(stack, valid + "%0A") == 400


# -- malformed requests and the log ---------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Authorization: Bearer {token}", id="authorization"),
        pytest.param("Sec-WebSocket-Protocol: waddle.v1, bearer.{token}", id="subprotocol"),
    ],
)
async def test_over_long_token_header_leaves_no_part_of_the_token_in_the_log(
    stack: Stack, header: str
) -> None:
    token = stack.token("longtoken", padding="p" * 9000)
    assert len(token) > 8190
    log = EdgeLog(stack)
    conn = await Raw.open(stack)
    try:
        await conn.send(
            upgrade_request(
                f"/channel/{cid()}/websocket", stack.edge_port(), header.format(token=token)
            )
        )
        head = await conn.response_head()
    finally:
        conn.close()
    assert status(head) == 400, head
    entries = await log.wait_for(lambda es: bool(bad_requests(es)))
    (entry,) = bad_requests(entries)
    assert entry["level"] == "info" and entry["error"] == "line too long", entry
    assert_no_failure_logged(entries)
    text = log.text()
    # Not a single 12-character piece of the token (its header, its claims).
    leaked = [token[i : i + 12] for i in range(len(token) - 11) if token[i : i + 12] in text]
    assert not leaked, leaked[:3]


@pytest.mark.parametrize(
    ("request_bytes", "error"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", "bad method", id="no-request-line"),
        pytest.param(b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", "bad method", id="bad-method"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "bad method", id="tls-hello"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHo\x01st: x\r\n\r\n", "malformed request", id="bad-header"
        ),
        pytest.param(
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "line too long", id="long-url"
        ),
    ],
)
async def test_malformed_request_is_one_info_line(
    stack: Stack, request_bytes: bytes, error: str
) -> None:
    log = EdgeLog(stack)
    conn = await Raw.open(stack)
    try:
        await conn.send(request_bytes)
        head = await conn.response_head()
        body = await asyncio.wait_for(conn.reader.read(), 10)
    finally:
        conn.close()
    assert status(head) == 400, head
    assert body == f"Bad request: {error}\n".encode(), body
    entries = await log.wait_for(lambda es: bool(bad_requests(es)))
    (entry,) = bad_requests(entries)
    assert entry["level"] == "info" and entry["error"] == error, entry
    assert entry["remote"] == "127.0.0.1", entry
    assert_no_failure_logged(entries)


# -- WebSocket framing -----------------------------------------------------------------


async def test_unmasked_client_frame_is_closed_with_1002(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Masked frames are served; an unmasked one is not processed, nor is
    anything after it, and the edge closes with 1002 (protocol error)."""
    channel_id = cid()
    member = await WsClient.connect(http, stack.ws_url(channel_id), token=stack.token("member"))
    assert (await member.recv())["type"] == "initial_state"
    conn = await Raw.open(stack)
    try:
        await conn.send(
            upgrade_request(
                f"/channel/{channel_id}/websocket",
                stack.edge_port(),
                f"Authorization: Bearer {stack.token('nomask')}",
            )
        )
        head = await conn.response_head()
        assert status(head) == 101, head
        assert (await server_text(conn.reader))["type"] == "initial_state"
        await conn.send(client_frame(0x1, orjson.dumps({"type": "ping"})))
        while (await server_text(conn.reader))["type"] != "pong":
            pass

        def message(content: str) -> bytes:
            return orjson.dumps({"type": "message", "content": content, "clientMsgId": content})

        await conn.send(
            client_frame(0x1, message("unmasked"), masked=False)
            + client_frame(0x1, message("after"))
        )
        # Until the close: presence at most, no ack, no message, no error.
        while (frame := await server_frame(conn.reader))[0] != 0x8:
            assert frame[0] == 0x1, frame
            assert orjson.loads(frame[1])["type"] not in ("ack", "message", "error"), frame
        assert struct.unpack("!H", frame[1][:2])[0] == 1002, frame
        async with asyncio.timeout(10):
            await conn.closed_after()
    finally:
        conn.close()
    # Neither message reached the channel: the member's own, sent after
    # them, is the first it gets.
    await member.send({"type": "message", "content": "control"})
    assert (await member.recv_message())["content"] == "control"
    await member.close()
