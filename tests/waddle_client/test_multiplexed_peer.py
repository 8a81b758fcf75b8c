"""``WaddleConnection`` against a scripted v1.1 server, frame by frame: the
resubscription of every channel with ``afterSeq`` and the resend of
unacknowledged messages with their ``clientMsgId`` after a reconnect,
refusals retried after ``retryAfterMs`` or raised, and the close codes
(1012 reconnects, 4001 renews the token, 1008 ends everything)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from tests.waddle_client.helpers import Recorder
from waddle_client import (
    ChannelClosed,
    ClientClosedError,
    ConnectionState,
    ErrorEvent,
    State,
    SubscribeError,
    WaddleConnection,
)

pytestmark = pytest.mark.timeout(30)
WAIT = 5.0


class MuxConn:
    """The server side of one socket."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def recv(self, kind: str, channel: str | None = None) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while True:
                frame = await self._inbox.get()
                if frame.get("type") == kind and channel in (None, frame.get("channelId")):
                    return frame

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_json(frame)

    async def initial_state(self, channel: str, last_seq: int, seqs: range = range(0)) -> None:
        await self.send(
            {
                "type": "initial_state",
                "channelId": channel,
                "messages": [message(channel, s) for s in seqs],
                "onlineUsers": [{"userId": "me", "username": "me", "status": "online"}],
                "onlineCount": 1,
                "lastSeq": last_seq,
                "readSeq": 0,
                "unreadCount": last_seq,
            }
        )


def message(channel: str, seq: int) -> dict[str, Any]:
    return {
        "id": f"{channel}-{seq}",
        "seq": seq,
        "channelId": channel,
        "userId": "zed",
        "username": "zed",
        "content": f"m{seq}",
        "timestamp": seq,
    }


class MuxPeer:
    def __init__(self) -> None:
        self.handshakes: list[str | None] = []
        self._new: asyncio.Queue[MuxConn] = asyncio.Queue()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/websocket", self._handler)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def next_connection(self) -> MuxConn:
        async with asyncio.timeout(WAIT):
            return await self._new.get()

    async def _handler(self, request: web.Request) -> web.WebSocketResponse:
        self.handshakes.append(request.headers.get("Authorization"))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = MuxConn(ws)
        self._new.put_nowait(conn)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame = msg.json()
                conn.frames.append(frame)
                conn._inbox.put_nowait(frame)
        return ws


@pytest_asyncio.fixture
async def peer() -> AsyncIterator[MuxPeer]:
    p = MuxPeer()
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest_asyncio.fixture
async def conn(peer: MuxPeer) -> AsyncIterator[WaddleConnection]:
    tokens = iter(f"tok{i}" for i in range(1, 100))
    client = WaddleConnection(
        peer.url,
        "tok0",
        token_provider=lambda: next(tokens),
        backoff_base=0.01,
        backoff_cap=0.04,
        random=lambda: 0.5,
        heartbeat=None,
    )
    try:
        yield client
    finally:
        await client.close()


async def test_resubscribes_every_channel_after_seq_and_resends_same_id(
    peer: MuxPeer, conn: WaddleConnection
) -> None:
    joining = asyncio.ensure_future(conn.subscribe("a"))
    first = await peer.next_connection()
    assert await first.recv("subscribe") == {"type": "subscribe", "channelId": "a"}
    await first.initial_state("a", 3, range(1, 4))
    a = await joining
    joining = asyncio.ensure_future(conn.subscribe("b"))
    await first.recv("subscribe", "b")
    await first.initial_state("b", 0)
    b = await joining
    rec_a = Recorder.following(a.events())
    cmid = a.send_nowait("unacked when the socket goes")
    sent = await first.recv("message")
    assert sent["channelId"] == "a" and sent["clientMsgId"] == cmid
    await first.ws.close(code=1012, message=b"restart")

    second = await peer.next_connection()
    sub_a, sub_b = await second.recv("subscribe", "a"), await second.recv("subscribe", "b")
    assert sub_a == {"type": "subscribe", "channelId": "a", "afterSeq": 3}
    assert sub_b == {"type": "subscribe", "channelId": "b", "afterSeq": 0}
    assert not [f for f in second.frames if f["type"] == "message"]  # not before initial_state
    await second.initial_state("a", 4)
    await second.send({"type": "message", "channelId": "a", "message": message("a", 4)})
    await second.send({"type": "sync_complete", "channelId": "a", "lastSeq": 4, "count": 1})
    resent = await second.recv("message")
    assert resent == sent  # same clientMsgId, same frame
    await second.send(
        {"type": "ack", "channelId": "a", "clientMsgId": cmid, "id": "x", "seq": 5, "timestamp": 5}
    )
    await asyncio.wait_for(a.flush(), WAIT)
    assert a.pending == ()
    assert await rec_a.wait_seqs(4) == [1, 2, 3, 4]
    assert a.read_seq == 5 and a.unread_count == 0  # sending moved the cursor
    assert not b.subscribed  # its initial_state has not come yet
    assert [f["type"] for f in second.frames if f.get("channelId") == "a"] == [
        "subscribe",
        "message",
    ]


async def test_retryable_refusal_is_retried_after_retry_after_and_forbidden_raises(
    peer: MuxPeer, conn: WaddleConnection
) -> None:
    events = Recorder(conn)
    joining = asyncio.ensure_future(conn.subscribe("full"))
    sock = await peer.next_connection()
    await sock.recv("subscribe", "full")
    loop = asyncio.get_running_loop()
    refused_at = loop.time()
    await sock.send(
        {
            "type": "error",
            "channelId": "full",
            "code": "channel_full",
            "message": "Channel full",
            "retryable": True,
            "retryAfterMs": 200,
        }
    )
    await sock.recv("subscribe", "full")
    assert loop.time() - refused_at >= 0.2  # not before retryAfterMs
    await sock.initial_state("full", 0)
    handle = await joining
    assert handle.subscribed
    refusal = await events.wait_for(ErrorEvent)
    assert (refusal.code, refusal.channel_id, refusal.retry_after) == ("channel_full", "full", 0.2)

    denied = asyncio.ensure_future(conn.subscribe("secret"))
    await sock.recv("subscribe", "secret")
    await sock.send(
        {"type": "error", "channelId": "secret", "code": "forbidden", "message": "Forbidden"}
    )
    with pytest.raises(SubscribeError) as info:
        await denied
    assert info.value.code == "forbidden" and "secret" not in conn.channels
    assert conn.state is State.OPEN and handle.subscribed


async def test_token_expiry_close_reconnects_with_a_fresh_token(
    peer: MuxPeer, conn: WaddleConnection
) -> None:
    states = Recorder(conn)
    await conn.connect()
    sock = await peer.next_connection()
    await sock.ws.close(code=4001, message=b"token expired")
    await peer.next_connection()
    retry = await states.wait_for(ConnectionState, lambda s: s.state is State.RECONNECTING)
    assert retry.close_code == 4001
    await states.wait_state(State.OPEN, start=states.events.index(retry))
    assert peer.handshakes == ["Bearer tok0", "Bearer tok1"]


async def test_policy_close_ends_the_connection_and_every_channel(
    peer: MuxPeer, conn: WaddleConnection
) -> None:
    joining = asyncio.ensure_future(conn.subscribe("a"))
    sock = await peer.next_connection()
    await sock.recv("subscribe")
    await sock.initial_state("a", 0)
    handle = await joining
    stream = handle.events()
    sending = asyncio.ensure_future(handle.send("never acked"))
    await sock.recv("message")
    await sock.ws.close(code=1008, message=b"abuse")
    reason = await asyncio.wait_for(conn.wait_closed(), WAIT)
    assert reason.close_code == 1008
    with pytest.raises(ClientClosedError):
        await sending
    events = [e async for e in stream]
    assert isinstance(events[-1], ChannelClosed) and events[-1].reason == "abuse"
    assert len(peer.handshakes) == 1 and conn.channels == {}
    with pytest.raises(ClientClosedError):
        await conn.subscribe("b")
