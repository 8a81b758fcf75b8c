"""Shard routing on the edge: channels map to links by rendezvous hashing,
warming up connects every shard before any client arrives, and the ring
follows shards going down, coming back, draining and the membership,
moving local channels with their unsettled publishes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from edge.auth import Identity
from edge.connection import Connection, Limits, LocalChannels, State
from edge.metrics import EdgeMetrics
from edge.shards import ShardLink, ShardRouter
from waddle_common.routing import owner_of
from waddle_pb import channel_pb2


@pytest_asyncio.fixture
async def shard_addresses() -> AsyncIterator[list[str]]:
    servers = []
    addresses = []
    for _ in range(2):
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    yield addresses
    for server in servers:
        await server.stop(0)


def router(addresses: list[str]) -> ShardRouter:
    metrics = EdgeMetrics()
    return ShardRouter(
        addresses,
        "edge-t",
        LocalChannels(metrics, Limits()),
        metrics,
        options=[],
        publish_timeout=5,
    )


async def test_links_follow_rendezvous_hashing(shard_addresses: list[str]) -> None:
    r = router(shard_addresses)
    try:
        for cid in (f"chan-{i}" for i in range(50)):
            assert r.link_for(cid).address == owner_of(cid, shard_addresses)
    finally:
        await r.close()


async def test_warm_up_connects_every_shard(shard_addresses: list[str]) -> None:
    cold, warm = router(shard_addresses), router(shard_addresses)
    try:
        warm.warm_up()
        async with asyncio.timeout(10):
            for ch in (link.channel for link in warm.links.values()):
                while (state := ch.get_state()) != grpc.ChannelConnectivity.READY:
                    await ch.wait_for_state_change(state)
        assert warm.ready()
        # Without it a channel stays idle until something uses it.
        assert all(
            link.channel.get_state() == grpc.ChannelConnectivity.IDLE
            for link in cold.links.values()
        )
    finally:
        await cold.close()
        await warm.close()


# -- the ring: down, up, drain and membership changes, without a network ------

ADDRESSES = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]


def _conn(local: LocalChannels, conn_id: int, channel_id: str, cursor: int = 0) -> Connection:
    conn = Connection(
        id=conn_id,
        channel_id=channel_id,
        identity=Identity(
            user_id=f"u{conn_id}",
            username=f"u{conn_id}",
            permissions=frozenset({"read", "write"}),
            avatar_url="",
            channels=None,
            expires_at=time.time() + 3600,
        ),
        joined_at_ms=1,
        state=State.LIVE,
        cursor=cursor,
    )
    local.add(conn)
    return conn


def _register(r: ShardRouter, conn: Connection) -> ShardLink:
    """What a join that the owner answered leaves behind, without a stream."""
    link = r.link_for(conn.channel_id)
    link.members[conn.id] = conn
    return link


def _publish(link: ShardLink, conn: Connection, key: str) -> None:
    pub = channel_pb2.Publish(conn_id=conn.id, channel_id=conn.channel_id, client_msg_id=key)
    link.inflight[(conn.id, key)] = (pub, time.monotonic() + 60)


def _attach(link: ShardLink, at: float, *, welcomes: int = 1) -> None:
    """The link's stream is open and welcomed since ``at``."""
    link.welcomed_at = at
    link.welcomes = welcomes
    link.up.set()


def _channels_on(r: ShardRouter, address: str, count: int = 60) -> list[str]:
    return [c for c in (f"ring-{i}" for i in range(count)) if owner_of(c, ADDRESSES) == address]


async def test_a_shard_down_long_enough_leaves_the_ring_and_its_channels_move() -> None:
    r = router(ADDRESSES)
    local = r.local
    victim = r.links[ADDRESSES[0]]
    channels = _channels_on(r, ADDRESSES[0])
    conns = [_conn(local, n, c, cursor=7) for n, c in enumerate(channels)]
    for conn in conns:
        _register(r, conn)
    _publish(victim, conns[0], "k1")
    now = time.monotonic()
    for link in r.links.values():
        _attach(link, now - 1)
    victim.welcomed_at = None
    victim.broken_since = now - 2.9
    r.check_health(now)  # not down yet: a restart that quick keeps its channels
    assert r.ring == tuple(sorted(ADDRESSES))
    r.check_health(now + 0.2)
    assert victim.down and r.ring == tuple(sorted(ADDRESSES[1:]))
    assert not victim.members and not victim.inflight
    for conn in conns:
        new = r.link_for(conn.channel_id)
        assert new.address == owner_of(conn.channel_id, ADDRESSES[1:])
        assert conn.id in new.members
        rejoin = [
            e.join
            for e in new._outbox
            if e.WhichOneof("kind") == "join" and e.join.conn_id == conn.id
        ]
        assert rejoin and rejoin[0].rejoin and rejoin[0].seen_seq == 7, "silent re-registration"
    owner = r.link_for(conns[0].channel_id)
    assert (conns[0].id, "k1") in owner.inflight
    assert [
        e.publish.client_msg_id for e in owner._outbox if e.WhichOneof("kind") == "publish"
    ] == ["k1"]
    assert r.metrics.channels_moved.labels("down")._value.get() == len(channels)
    assert r.metrics.failover_seconds._sum.get() > 0
    await r.close()


async def test_a_shard_back_for_up_seconds_gets_its_channels_back_and_the_interim_owner_a_leave() -> (
    None
):
    r = router(ADDRESSES)
    channels = _channels_on(r, ADDRESSES[0])
    conn = _conn(r.local, 1, channels[0])
    now = time.monotonic()
    for link in r.links.values():
        _attach(link, now - 100)
    victim = r.links[ADDRESSES[0]]
    victim.welcomed_at = None
    victim.broken_since = now - 100
    _register(r, conn)  # routed while the victim is still in the ring
    r.check_health(now)
    interim = r.link_for(conn.channel_id)
    assert interim is not victim
    interim._outbox.clear()
    _publish(interim, conn, "k2")
    _attach(victim, now, welcomes=2)  # it failed before: it must stay up a while
    r.check_health(now + 5)
    assert r.link_for(conn.channel_id) is interim
    r.check_health(now + 10.5)
    assert r.link_for(conn.channel_id) is victim and conn.id in victim.members
    leaves = [e.leave.conn_id for e in interim._outbox if e.WhichOneof("kind") == "leave"]
    assert leaves == [conn.id], "the interim owner releases the connection"
    # The interim owner can still settle the publish it took: it stays there.
    assert (conn.id, "k2") in interim.inflight and not victim.inflight
    assert r.metrics.ring_changes.labels("up")._value.get() == 1
    await r.close()


async def test_draining_moves_channels_at_once_and_resends_unsettled_publishes() -> None:
    r = router(ADDRESSES)
    channels = _channels_on(r, ADDRESSES[1])
    conns = [_conn(r.local, n, c) for n, c in enumerate(channels)]
    for conn in conns:
        _register(r, conn)
    now = time.monotonic()
    for link in r.links.values():
        _attach(link, now)
    draining = r.links[ADDRESSES[1]]
    _publish(draining, conns[0], "k3")
    draining._dispatch(
        channel_pb2.ShardBatch(events=[channel_pb2.ShardEvent(draining=channel_pb2.Draining())])
    )
    assert draining.address not in r.ring and not draining.members and not draining.inflight
    owner = r.link_for(conns[0].channel_id)
    assert (conns[0].id, "k3") in owner.inflight
    # A draining shard gets no leaves: it is going away and answers nothing.
    assert not [e for e in draining._outbox if e.WhichOneof("kind") == "leave"]
    # A new process on that address, welcomed as not draining, is back after up_after.
    draining._dispatch(
        channel_pb2.ShardBatch(events=[channel_pb2.ShardEvent(welcome=channel_pb2.Welcome())])
    )
    r.check_health(time.monotonic() + 11)
    assert draining.address in r.ring
    await r.close()


async def test_membership_changes_move_about_one_channel_in_n(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = router(ADDRESSES)
    # A running router (its links would dial out; here they stay quiet).
    monkeypatch.setattr(ShardLink, "ensure_started", lambda self: None)
    r.start()
    channels = [f"scale-{i}" for i in range(400)]
    conns = [_conn(r.local, n, c) for n, c in enumerate(channels)]
    for conn in conns:
        _register(r, conn)
    bigger = [*ADDRESSES, "10.0.0.4:1"]
    r.set_shards(bigger)
    # A new shard holds no channel before it serves.
    assert "10.0.0.4:1" not in r.ring
    assert r.metrics.channels_moved.labels("membership")._value.get() == 0
    welcome = channel_pb2.ShardEvent(welcome=channel_pb2.Welcome())
    r.links["10.0.0.4:1"]._dispatch(channel_pb2.ShardBatch(events=[welcome]))
    assert "10.0.0.4:1" in r.ring
    moved = r.metrics.channels_moved.labels("up")._value.get()
    assert 60 < moved < 140, moved  # about 1/4 of 400
    assert all(r.link_for(c.channel_id).address == owner_of(c.channel_id, bigger) for c in conns)
    # A shard leaving the membership keeps its link until its publishes settle.
    gone = r.links[ADDRESSES[0]]
    _attach(gone, time.monotonic())
    victim_conn = next(c for c in conns if owner_of(c.channel_id, bigger) == ADDRESSES[0])
    _publish(gone, victim_conn, "k4")
    r.set_shards(bigger[1:])
    assert ADDRESSES[0] in r.retired and (victim_conn.id, "k4") in gone.inflight
    r.check_health(time.monotonic())
    assert ADDRESSES[0] in r.retired
    gone.inflight.clear()
    r.check_health(time.monotonic())
    assert ADDRESSES[0] not in r.retired
    # An empty answer changes nothing.
    r.set_shards([])
    assert r.shards == tuple(sorted(bigger[1:]))
    await r.close()


async def test_a_join_result_marks_its_connection_answered_before_what_follows() -> None:
    """A JoinResult marks its connection answered as it is dispatched, before
    any later event of the stream is handed out, so joins and leaves after
    it are kept for the connection (``LocalChannels.answered``)."""
    local = LocalChannels(EdgeMetrics(), Limits())
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        link = ShardLink("127.0.0.1:1", "e", channel, local, EdgeMetrics(), publish_timeout=1)
        conn = Connection(
            id=7,
            channel_id="c",
            identity=Identity("b", "b", frozenset({"read"}), "", None, 0.0),
            joined_at_ms=0,
        )
        local.add(conn)
        future: asyncio.Future[channel_pb2.JoinResult] = asyncio.get_running_loop().create_future()
        link.joins[conn.id] = future
        link._dispatch(
            channel_pb2.ShardBatch(
                events=[channel_pb2.ShardEvent(join_result=channel_pb2.JoinResult(conn_id=7))]
            )
        )
        assert future.done() and conn.answered and conn.state is State.JOINING
    finally:
        await channel.close()
