"""Limits against the real services: rate limits, abuse, connection caps,
origin checks, token expiry and slow consumers. Each limit is set low for
the test through its WADDLE_ variable."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

LIMITS = {
    "WADDLE_MESSAGE_RATE": "2",
    "WADDLE_MESSAGE_BURST": "5",
    "WADDLE_TYPING_RATE": "1",
    "WADDLE_TYPING_BURST": "3",
    "WADDLE_FRAME_RATE": "20",
    "WADDLE_FRAME_BURST": "40",
    "WADDLE_ABUSE_BURST": "8",
    "WADDLE_USER_MAX_CONNECTIONS": "2",
    "WADDLE_EDGE_MAX_CONNECTIONS": "12",
    "WADDLE_SEND_BUFFER_BYTES": "4096",
    "WADDLE_ALLOWED_ORIGINS": "https://chat.example",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("limits"), env=LIMITS) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def cid() -> str:
    return f"lim-{uuid.uuid4().hex[:8]}"


async def connect(
    http: aiohttp.ClientSession, stack: Stack, channel_id: str, user: str, **kw: object
) -> WsClient:
    client = await WsClient.connect(http, stack.ws_url(channel_id), token=stack.token(user, **kw))  # type: ignore[arg-type]
    assert (await client.recv())["type"] == "initial_state"
    return client


async def test_message_rate_limit_answers_with_retry_after(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    c = await connect(http, stack, cid(), "rapid")
    for i in range(7):
        await c.send({"type": "message", "content": f"m{i}", "clientMsgId": f"k{i}"})
    # 5 x (message + ack) for the burst, and 2 errors for the rest.
    frames = [await c.recv() for _ in range(5 * 2 + 2)]
    errors = [f for f in frames if f["type"] == "error"]
    acks = [f for f in frames if f["type"] == "ack"]
    assert len(acks) == 5 and len(errors) == 2, [f["type"] for f in frames]
    for err in errors:
        assert err["code"] == "rate_limited" and err["message"] == "Rate limited"
        assert err["retryable"] is True and 0 < err["retryAfterMs"] <= 1000
    assert {e["clientMsgId"] for e in errors} == {"k5", "k6"}
    # Typing has its own budget: still allowed after messages ran out.
    await c.send({"type": "typing", "isTyping": True})
    await c.send({"type": "ping"})
    assert (await c.recv())["type"] == "pong"
    await c.close()


async def test_message_backpressure_never_closes(stack: Stack, http: aiohttp.ClientSession) -> None:
    """A client flushing a long queue after a reconnect is slowed down, not banned."""
    c = await connect(http, stack, cid(), "flusher")
    for i in range(30):
        await c.send({"type": "message", "content": f"queued {i}", "clientMsgId": f"q{i}"})
    refused = 0
    async with asyncio.timeout(10):
        seen = 0
        while seen < 30:
            frame = await c.recv()
            if frame["type"] == "error":
                assert frame["code"] == "rate_limited"
                refused += 1
            if frame["type"] in ("error", "ack"):
                seen += 1
    assert refused == 25
    await c.send({"type": "ping"})
    assert (await c.recv_type("pong"))["type"] == "pong"
    await c.close()


async def test_frame_flood_closes_1008(stack: Stack, http: aiohttp.ClientSession) -> None:
    c = await connect(http, stack, cid(), "flooder")
    for _ in range(200):
        if c.ws.closed:
            break
        await c.send({"type": "ping"})
    assert await c.wait_closed() == 1008


async def test_sustained_abuse_closes_1008(stack: Stack, http: aiohttp.ClientSession) -> None:
    channel_id = cid()
    bystander = await connect(http, stack, channel_id, "calm")
    abuser = await connect(http, stack, channel_id, "abuser")
    for _ in range(30):
        if abuser.ws.closed:
            break
        await abuser.ws.send_str("garbage")
    assert await abuser.wait_closed() == 1008
    # The channel still works for everyone else.
    await bystander.send({"type": "message", "content": "still fine"})
    assert (await bystander.recv_message())["content"] == "still fine"
    await bystander.close()


async def test_per_user_connection_limit(stack: Stack, http: aiohttp.ClientSession) -> None:
    channel_id = cid()
    a = await connect(http, stack, channel_id, "multi")
    b = await connect(http, stack, channel_id, "multi")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await connect(http, stack, channel_id, "multi")
    assert info.value.status == 429
    other = await connect(http, stack, cid(), "multi")  # another channel is fine
    for c in (a, b, other):
        await c.close()


async def test_per_edge_connection_limit(stack: Stack, http: aiohttp.ClientSession) -> None:
    clients = []
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        for i in range(20):
            clients.append(await connect(http, stack, cid(), f"crowd{i}"))
    assert info.value.status == 503
    assert len(clients) <= 12
    for c in clients:
        await c.close()


async def test_origin_allow_list(stack: Stack, http: aiohttp.ClientSession) -> None:
    token = stack.token("browser")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(
            stack.ws_url(cid()),
            headers={"Origin": "https://evil.example"},
            protocols=("waddle.v1", f"bearer.{token}"),
        )
    assert info.value.status == 403
    ws = await http.ws_connect(
        stack.ws_url(cid()),
        headers={"Origin": "https://chat.example"},
        protocols=("waddle.v1", f"bearer.{token}"),
    )
    assert (await ws.receive_json(timeout=10))["type"] == "initial_state"
    await ws.close()


async def test_token_expiry_while_connected_closes_4001(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    c = await connect(http, stack, cid(), "shortlived", ttl=2)
    assert await c.wait_closed(timeout=15) == 4001


async def _raw_upgrade(
    port: int, path: str, token: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that never reads after the handshake: a stalled phone."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    status = await reader.readuntil(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 101"), status
    return reader, writer


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def roomy(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """Generous rates, tiny send buffers: for the slow-consumer test."""
    env = {
        "WADDLE_SEND_BUFFER_BYTES": "4096",
        "WADDLE_MESSAGE_RATE": "5000",
        "WADDLE_MESSAGE_BURST": "5000",
        "WADDLE_FRAME_RATE": "5000",
        "WADDLE_FRAME_BURST": "5000",
    }
    async with start_stack(tmp_path_factory.mktemp("roomy"), env=env) as s:
        yield s


async def slow_consumer_closes(http: aiohttp.ClientSession, stack: Stack) -> float:
    async with http.get(stack.http_url("/metrics")) as resp:
        text = await resp.text()
    line = next(
        ln for ln in text.splitlines() if ln.startswith("waddle_edge_slow_consumer_closes_total")
    )
    return float(line.split()[-1])


async def test_slow_consumer_is_closed_and_others_unaffected(
    roomy: Stack, http: aiohttp.ClientSession
) -> None:
    channel_id = cid()
    fast = await connect(http, roomy, channel_id, "fast")
    _, slow_writer = await _raw_upgrade(
        roomy.edge_port(), f"/channel/{channel_id}/websocket", roomy.token("slow")
    )
    sender = await connect(http, roomy, channel_id, "sender")
    body = "z" * 3900
    seqs: list[int] = []
    # Enough data to fill the kernel's socket buffers (a few MB on loopback)
    # behind the stalled reader; checked after every batch.
    async with asyncio.timeout(90):
        for _batch in range(40):
            for _ in range(100):
                await sender.send({"type": "message", "content": body})
            while len(seqs) < (_batch + 1) * 100:
                seqs.append((await fast.recv_message())["seq"])
            if await slow_consumer_closes(http, roomy) >= 1:
                break
    assert await slow_consumer_closes(http, roomy) >= 1, "the stalled socket was not closed"
    assert seqs == list(range(1, len(seqs) + 1)), "the fast member got every message in order"
    slow_writer.close()
    await fast.close()
    await sender.close()
