"""The edge's heartbeat: one timer writes an unsolicited pong to every open
WebSocket once per interval, a share of them per tick (nothing a client
answers), sockets get a
kernel deadline for unacknowledged data, closed sockets get nothing and an
edge with no socket runs no timer. And the shard link's answers to a waking
owner: ``Rehydrate`` re-registers the channel's answered connections,
``Head`` makes the ones that are behind catch up."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
import pytest_asyncio

from edge.auth import Identity
from edge.connection import Connection, Limits, LocalChannels, State
from edge.heartbeat import Heartbeat
from edge.metrics import EdgeMetrics
from edge.shards import ShardLink
from edge.upgraded import EdgeSocket
from tests.edge.sockets import Ignore, serve, upgrade_route
from waddle_pb import channel_pb2

INTERVAL = 0.1


class Quiet:
    """A socket that only gets heartbeats; it leaves the heartbeat when it ends."""

    def __init__(self, sock: EdgeSocket, heartbeat: Heartbeat) -> None:
        self.sock, self.heartbeat = sock, heartbeat

    def on_text(self, text: str) -> bool:
        return True

    def on_binary(self) -> bool:
        return True

    def on_closed(self, code: int | None) -> None:
        self.heartbeat.discard(self.sock)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[str, Heartbeat, list[EdgeSocket]]]:
    heartbeat = Heartbeat(INTERVAL, slice_size=2)
    sockets: list[EdgeSocket] = []

    def opened(sock: EdgeSocket) -> None:
        heartbeat.add(sock)
        sockets.append(sock)

    route = upgrade_route(lambda sock: Quiet(sock, heartbeat), on_open=opened)
    async with serve(route) as (port, _handshakes, _reasons):
        yield f"http://127.0.0.1:{port}/", heartbeat, sockets
        heartbeat.stop()


async def beats(ws: aiohttp.ClientWebSocketResponse, n: int) -> int:
    """Receive ``n`` heartbeats: pongs, never pings, which a client must answer."""
    got = 0
    async with asyncio.timeout(5):
        while got < n:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.PONG, msg
            assert msg.data == b""
            got += 1
    return got


async def test_one_timer_beats_every_socket(
    server: tuple[str, Heartbeat, list[EdgeSocket]],
) -> None:
    url, heartbeat, sockets = server
    async with aiohttp.ClientSession() as http:
        # autoping off: the client sees the server's heartbeats.
        clients = [await http.ws_connect(url, autoping=False) for _ in range(5)]
        async with asyncio.timeout(5):
            while len(heartbeat) < 5:  # noqa: ASYNC110 - registration has no event
                await asyncio.sleep(0.01)
        for client in clients:
            assert await beats(client, 2) == 2
        # Each socket has its kernel deadline: two intervals of unacknowledged data.
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            for ws in sockets:
                raw = ws.transport.get_extra_info("socket")
                timeout = raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
                assert timeout == int(2 * INTERVAL * 1000)
        for client in clients:
            await client.close()
        async with asyncio.timeout(5):
            while len(heartbeat):  # noqa: ASYNC110 - the handlers end on their own time
                await asyncio.sleep(0.01)
        async with asyncio.timeout(5):
            # The next tick finds nobody and does not re-arm.
            while heartbeat._timer is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


async def test_a_closing_socket_gets_no_heartbeat(
    server: tuple[str, Heartbeat, list[EdgeSocket]],
) -> None:
    url, heartbeat, sockets = server
    async with aiohttp.ClientSession() as http:
        client = await http.ws_connect(url, autoping=False)
        await beats(client, 1)
        ws = sockets[0]
        before = heartbeat.beats
        ws.close()
        msg = await client.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        await client.close()
        assert heartbeat.beats == before, "nothing after the close frame"


class CountingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.frames.append(bytes(data))

    def is_closing(self) -> bool:
        return False


async def test_a_round_is_spread_over_the_interval() -> None:
    heartbeat = Heartbeat(3.0, step=1.0, slice_size=10_000)
    transports = [CountingTransport() for _ in range(600)]
    sockets = {EdgeSocket(t, max_size=1024, session=lambda _: Ignore()): t for t in transports}
    try:
        for sock in sockets:
            heartbeat.add(sock)
        assert heartbeat.slots == 3 and len(heartbeat) == 600
        per_tick = []
        for _ in range(3):
            before = heartbeat.beats
            heartbeat._tick()  # as the timer does, one step apart
            per_tick.append(heartbeat.beats - before)
        assert all(100 < n < 300 for n in per_tick), per_tick
        assert [t.frames for t in sockets.values()] == [[b"\x8a\x00"]] * 600, (
            "every socket once per interval"
        )
        gone = next(iter(sockets))
        heartbeat.discard(gone)
        for _ in range(3):
            heartbeat._tick()
        assert len(sockets[gone].frames) == 1 and heartbeat.beats == 1199
    finally:
        heartbeat.stop()


# -- the shard link's answers ------------------------------------------------------


def conn(local: LocalChannels, conn_id: int, user: str, *, cursor: int = 0) -> Connection:
    c = Connection(
        id=conn_id,
        channel_id="room",
        identity=Identity(user, user.upper(), frozenset({"read"}), "", None, 0.0),
        joined_at_ms=1000 + conn_id,
        status="away" if conn_id == 1 else "online",
        state=State.LIVE,
    )
    c.cursor = c.floor = cursor
    local.add(c)
    return c


@pytest.mark.parametrize("kind", ["rehydrate", "head"])
async def test_the_link_answers_a_waking_owner(kind: str) -> None:
    metrics = EdgeMetrics()
    local = LocalChannels(metrics, Limits())
    gaps: list[int] = []
    local.on_gap = lambda c: gaps.append(c.id)
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never dialled
    link = ShardLink("x", "edge-t", channel, local, metrics, publish_timeout=5)
    try:
        link.up.set()  # as while a stream is open
        answered = [conn(local, 1, "ann", cursor=3), conn(local, 2, "bob", cursor=5)]
        joining = conn(local, 3, "cat")
        conn(local, 4, "dan").channel_id = "elsewhere"
        for c in (*answered, joining):
            link.members[c.id] = c
        link.joins[joining.id] = asyncio.get_running_loop().create_future()
        if kind == "rehydrate":
            event = channel_pb2.ShardEvent(rehydrate=channel_pb2.Rehydrate(channel_id="room"))
        else:
            event = channel_pb2.ShardEvent(head=channel_pb2.Head(channel_id="room", last_seq=4))
        link._dispatch(channel_pb2.ShardBatch(events=[event]))
        if kind == "rehydrate":
            (out,) = link._outbox
            answer = out.rehydrated
            assert answer.channel_id == "room"
            assert [
                (j.conn_id, j.rejoin, j.member.user_id, j.member.status) for j in answer.members
            ] == [
                (1, True, "ann", "away"),
                (2, True, "bob", "online"),
            ]
            assert answer.members[0].member.joined_at_ms == 1001
            assert gaps == []
        else:
            assert link._outbox == []
            assert gaps == [1], "only the connection behind the head catches up"
            assert answered[0].state is State.SYNCING and answered[1].state is State.LIVE
    finally:
        await channel.close()
