"""``WaddleConnection`` (protocol v1.1) against the real services: one socket
in channels spread over two channel shards, subscribe/unsubscribe, refusals
per channel, gap-free exactly-once resumption of every channel after the
edge is killed, history pages and threads, read cursors across two
connections of one user, and a token that expires while connected."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.conftest import GENEROUS_LIMITS
from tests.support.stack import Stack, start_stack
from tests.waddle_client.helpers import Recorder
from waddle_client import (
    Ack,
    ChannelClosed,
    ChannelClosedError,
    ChannelHandle,
    ConnectionState,
    ErrorEvent,
    InitialState,
    Message,
    Presence,
    PresenceDiff,
    ReadReceipt,
    State,
    SubscribeError,
    Typing,
    WaddleConnection,
)
from waddle_common.routing import owner_of

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

MAX_SUBSCRIPTIONS = 4
ENV = {
    **GENEROUS_LIMITS,
    "WADDLE_MAX_SUBSCRIPTIONS": str(MAX_SUBSCRIPTIONS),
    "WADDLE_USER_MAX_CONNECTIONS": "2",
    "WADDLE_PRESENCE_LINGER_SECONDS": "0",
}
SETTLE = 30.0  # upper bound for a condition to hold after a fault


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("client-mux")
    async with start_stack(tmp, shards=2, edges=2, env=ENV) as s:
        yield s


class Connections:
    """The connections of one test, closed at the end."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.all: list[WaddleConnection] = []
        self.tokens_asked: dict[str, int] = {}

    def new(
        self, user: str, *, edge: int | list[int] = 0, ttl: float = 3600, **claims: Any
    ) -> WaddleConnection:
        stack = self.stack
        edges = [edge] if isinstance(edge, int) else edge

        def renew() -> str:
            self.tokens_asked[user] = self.tokens_asked.get(user, 0) + 1
            return stack.token(user, **claims)

        conn = WaddleConnection(
            [f"http://127.0.0.1:{stack.edge_port(i)}" for i in edges],
            stack.token(user, ttl=ttl, **claims),
            token_provider=renew,
            backoff_base=0.05,
            backoff_cap=0.5,
            heartbeat=5.0,
        )
        self.all.append(conn)
        return conn

    async def close(self) -> None:
        for conn in self.all:
            await conn.close()


@pytest_asyncio.fixture(loop_scope="module")
async def conns(stack: Stack) -> AsyncIterator[Connections]:
    group = Connections(stack)
    try:
        yield group
    finally:
        await group.close()


def channels(stack: Stack, per_shard: int) -> list[str]:
    """Fresh channel ids, ``per_shard`` owned by each shard, interleaved."""
    shards = stack.shard_addresses
    found: dict[str, list[str]] = {s: [] for s in shards}
    while any(len(v) < per_shard for v in found.values()):
        cid = f"cl-{uuid.uuid4().hex[:8]}"
        owned = found[owner_of(cid, shards)]
        if len(owned) < per_shard:
            owned.append(cid)
    return [c for group in zip(*found.values(), strict=True) for c in group]


async def subscribe(conn: WaddleConnection, cid: str) -> tuple[ChannelHandle, Recorder]:
    handle = await asyncio.wait_for(conn.subscribe(cid), SETTLE)
    return handle, Recorder.following(handle.events())


def contents(rec: Recorder) -> list[str]:
    return [m.content for m in rec.of(Message)]


async def test_one_connection_in_three_channels_on_two_shards(
    stack: Stack, conns: Connections
) -> None:
    chans = channels(stack, 2)[:3]
    assert len({owner_of(c, stack.shard_addresses) for c in chans}) == 2
    alice = conns.new("cl-alice")
    everything = Recorder(alice)
    mine = {c: await subscribe(alice, c) for c in chans}
    bob = conns.new("cl-bob", edge=1)
    theirs = {c: await subscribe(bob, c) for c in chans}
    assert set(alice.channels) == set(chans) and conns.tokens_asked == {}
    # Bob's arrival reaches alice in each channel as a presence_diff.
    for cid, (handle, rec) in mine.items():
        diff = await rec.wait_for(
            PresenceDiff, lambda d: any(u.user_id == "cl-bob" for u in d.joins)
        )
        assert diff.channel_id == cid and "cl-bob" in handle.online_users
    # Interleaved sends: each channel has its own seqs, exactly once, in order.
    ids = {c: [theirs[c][0].send_nowait(f"{c}-{i}") for i in range(10)] for c in chans}
    async with asyncio.timeout(SETTLE):
        await bob.flush()
    for cid, (handle, rec) in mine.items():
        assert await rec.wait_seqs(10) == list(range(1, 11))
        assert contents(rec) == [f"{cid}-{i}" for i in range(10)]
        assert all(m.channel_id == cid for m in rec.of(Message))
        acks = theirs[cid][1].of(Ack)
        assert sorted(a.client_msg_id for a in acks) == sorted(ids[cid])
        assert handle.last_seq == 10 and handle.unread_count == 10
    # The connection's own stream sees every channel's messages, named.
    await everything.wait_count(Message, 30)
    assert {m.channel_id for m in everything.of(Message)} == set(chans)
    # Typing and presence stay in their channel.
    a, b, c = chans
    assert await theirs[b][0].typing()
    typing = await mine[b][1].wait_for(Typing)
    assert typing.user_id == "cl-bob" and typing.is_typing and typing.channel_id == b
    assert await theirs[c][0].presence("away")
    status = await mine[c][1].wait_for(Presence)
    assert status.status == "away" and mine[c][0].online_users["cl-bob"].status == "away"
    assert not mine[a][1].of(Typing) and not mine[a][1].of(Presence)
    # Bob leaves one channel: alice sees him go there only.
    await theirs[a][0].unsubscribe()
    left = await mine[a][1].wait_for(PresenceDiff, lambda d: bool(d.leaves))
    assert [u.user_id for u in left.leaves] == ["cl-bob"]
    assert "cl-bob" not in mine[a][0].online_users and "cl-bob" in mine[b][0].online_users


async def test_subscribe_and_unsubscribe(stack: Stack, conns: Connections) -> None:
    a, b = channels(stack, 1)
    carol = conns.new("cl-carol")
    dave = conns.new("cl-dave", edge=1)
    (_, rec_a), (hb, rec_b) = await subscribe(carol, a), await subscribe(carol, b)
    assert await carol.subscribe(b) is hb  # already subscribed: the same handle
    da, _ = await subscribe(dave, a)
    db, _ = await subscribe(dave, b)
    await db.send("before")
    await rec_b.wait_seqs(1)
    stream = hb.events()
    await hb.unsubscribe()
    assert b not in carol.channels and not hb.subscribed
    closed = [e async for e in stream]  # the iteration ends
    assert isinstance(closed[-1], ChannelClosed) and closed[-1].code == "unsubscribed"
    with pytest.raises(ChannelClosedError):
        await hb.send("too late")
    # Its messages stop; the other channel's go on, on the same socket.
    await db.send("after unsubscribe")
    await da.send("still here")
    assert (await rec_a.wait_for(Message)).content == "still here"
    assert contents(rec_b) == ["before"]
    # Subscribing again gives a new handle, starting from the channel's history.
    hb2, rec_b2 = await subscribe(carol, b)
    assert hb2 is not hb and hb2.subscribed
    assert await rec_b2.wait_seqs(2) == [1, 2]
    assert contents(rec_b2) == ["before", "after unsubscribe"]
    assert carol.state is State.OPEN


async def test_refusals_are_per_channel(stack: Stack, conns: Connections) -> None:
    chans = channels(stack, 3)
    allowed, other = chans[:5], chans[5]
    erin = conns.new("cl-erin", channels=allowed)
    with pytest.raises(SubscribeError) as refused:
        await erin.subscribe(other)
    assert refused.value.code == "forbidden" and refused.value.channel_id == other
    assert other not in erin.channels and erin.state is State.OPEN
    handles = [(await subscribe(erin, c))[0] for c in allowed[:MAX_SUBSCRIPTIONS]]
    with pytest.raises(SubscribeError) as full:
        await erin.subscribe(allowed[MAX_SUBSCRIPTIONS])
    assert full.value.code == "too_many_subscriptions"
    # The socket and the other channels are unaffected.
    ack = await handles[0].send("still working")
    assert ack.seq == 1 and erin.state is State.OPEN
    with pytest.raises(ValueError):
        await erin.subscribe("not a channel id")


async def test_user_limit_is_retried_after_retry_after(stack: Stack, conns: Connections) -> None:
    """WADDLE_USER_MAX_CONNECTIONS is 2: a third connection of the user waits
    (refused with user_limit, asked again after retryAfterMs) and gets in
    once one of the others leaves."""
    cid = channels(stack, 1)[0]
    first, second, third = (conns.new("cl-frank", edge=i % 2) for i in range(3))
    h1, _ = await subscribe(first, cid)
    await subscribe(second, cid)
    refusals = Recorder(third)
    joining = asyncio.ensure_future(third.subscribe(cid))
    refused = await refusals.wait_for(ErrorEvent, lambda e: e.code == "user_limit", timeout=SETTLE)
    assert refused.channel_id == cid and refused.retry_after is not None and refused.retryable
    assert not joining.done()
    await h1.unsubscribe()
    handle = await asyncio.wait_for(joining, SETTLE)
    assert handle.subscribed and third.state is State.OPEN


async def test_every_channel_resumes_exactly_once_after_the_edge_is_killed(
    stack: Stack, conns: Connections
) -> None:
    chans = channels(stack, 2)[:3]
    reader = conns.new("cl-reader", edge=0)  # on the edge that is killed
    writer = conns.new("cl-writer", edge=1)
    states = Recorder(reader)
    mine = {c: await subscribe(reader, c) for c in chans}
    theirs = {c: (await subscribe(writer, c))[0] for c in chans}
    for cid in chans:
        for i in range(3):
            await theirs[cid].send(f"before {i}")
    for _, rec in mine.values():
        await rec.wait_seqs(3)
    marks = {c: len(rec.events) for c, (_, rec) in mine.items()}

    restart = asyncio.ensure_future(stack.restart_edge(0))
    await states.wait_state(State.RECONNECTING, timeout=SETTLE)
    # While the reader is away: the writer publishes, the reader queues its own.
    queued = {c: [mine[c][0].send_nowait(f"offline {i}") for i in range(3)] for c in chans}
    for cid in chans:
        for i in range(4):
            await theirs[cid].send(f"missed {i}")
    assert reader.state is not State.OPEN and len(reader.pending) == 9
    await restart

    async with asyncio.timeout(SETTLE):
        await reader.flush()
    assert reader.pending == ()
    for cid, (handle, rec) in mine.items():
        total = 3 + 4 + 3
        assert await rec.wait_seqs(total, timeout=SETTLE) == list(range(1, total + 1))
        assert sorted(a.client_msg_id for a in rec.of(Ack)) == sorted(queued[cid])
        # Resumed with afterSeq: no history window again, the replay brought the rest.
        resumed = [s for s in rec.of(InitialState)[1:] if s.reconnect]
        assert resumed and all(s.messages == () for s in resumed)
        assert not [e for e in rec.events[marks[cid] :] if isinstance(e, ErrorEvent)]
        assert handle.subscribed and handle.last_seq == total
    # Each queued message was stored once: the writer sees each exactly once.
    for cid in chans:
        page = await theirs[cid].history(limit=100)
        stored = [m.content for m in page.messages]
        assert [m.seq for m in page.messages] == list(range(1, 11))
        assert sorted(s for s in stored if s.startswith("offline")) == [
            f"offline {i}" for i in range(3)
        ]
    assert sorted(reader.channels) == sorted(chans)


async def test_history_pages_backwards_and_follows_threads(
    stack: Stack, conns: Connections
) -> None:
    cid = channels(stack, 1)[0]
    conn = conns.new("cl-historian")
    handle, _ = await subscribe(conn, cid)
    root = await handle.send("root")
    for i in range(1, 61):
        await handle.send(
            f"reply {i}" if i % 10 == 0 else f"m{i}", thread_id=root.id if i % 10 == 0 else None
        )
    pages = [page async for page in handle.pages(limit=25)]
    assert [len(p.messages) for p in pages] == [25, 25, 11]
    assert [p.has_more for p in pages] == [True, True, False]
    every = [m.seq for p in reversed(pages) for m in p.messages]
    assert every == list(range(1, 62))
    first = pages[-1].messages[0]
    assert first.id == root.id and first.reply_count == 6
    newest = await handle.history(limit=4, thread_id=root.id)
    assert [m.content for m in newest.messages] == [f"reply {i}" for i in (30, 40, 50, 60)]
    assert newest.has_more and all(m.thread_id == root.id for m in newest.messages)
    assert newest.first_seq is not None
    older = await handle.history(before_seq=newest.first_seq, limit=100, thread_id=root.id)
    assert [m.content for m in older.messages] == ["reply 10", "reply 20"]
    assert not older.has_more
    with pytest.raises(ValueError):
        await handle.history(limit=500)


async def test_read_cursor_and_unread_counts_across_two_connections(
    stack: Stack, conns: Connections
) -> None:
    cid = channels(stack, 1)[0]
    writer = conns.new("cl-chatty", edge=1)
    wh, wrec = await subscribe(writer, cid)
    for i in range(10):
        await wh.send(f"m{i}")
    phone = conns.new("cl-reader2", edge=0)
    laptop = conns.new("cl-reader2", edge=1)
    ph, prec = await subscribe(phone, cid)
    lh, lrec = await subscribe(laptop, cid)
    assert (ph.read_seq, ph.unread_count) == (0, 10)
    assert (lh.read_seq, lh.unread_count) == (0, 10)
    assert await ph.mark_read(7) == 7
    assert ph.unread_count == 3
    await lrec.wait_for(ReadReceipt, lambda r: r.own and r.seq == 7)
    assert (lh.read_seq, lh.unread_count) == (7, 3)
    # Never back; None reads up to the last message delivered.
    assert await ph.mark_read(3) == 7
    assert await ph.mark_read() == 10
    await lrec.wait_for(ReadReceipt, lambda r: r.own and r.seq == 10)
    assert lh.unread_count == 0
    # The other member gets a (coalesced) receipt.
    await wrec.wait_for(ReadReceipt, lambda r: r.user_id == "cl-reader2" and r.seq == 10)
    # New messages from others count on both devices.
    await wh.send("new 1")
    await wh.send("new 2")
    await lrec.wait_seqs(12)
    assert lh.unread_count == 2
    # Sending moves the sender's cursor, on both devices.
    ack = await lh.send("mine")
    assert (lh.read_seq, lh.unread_count) == (ack.seq, 0)
    await prec.wait_for(Message, lambda m: m.seq == ack.seq)  # and its read frame, in any order
    assert (ph.read_seq, ph.unread_count) == (ack.seq, 0)
    # Another device (in place of the phone: two per user here) starts from
    # the server's cursor.
    await phone.close()
    tablet = conns.new("cl-reader2", edge=0)
    th, _ = await subscribe(tablet, cid)
    assert th.read_seq == ack.seq and th.unread_count == 0


async def test_expired_token_is_renewed_and_channels_resume(
    stack: Stack, conns: Connections
) -> None:
    a, b = channels(stack, 1)
    grace = conns.new("cl-grace", ttl=2)  # expires while connected: closed with 4001
    states = Recorder(grace)
    writer = conns.new("cl-writer2", edge=1)
    handles = {c: await subscribe(grace, c) for c in (a, b)}
    theirs = {c: (await subscribe(writer, c))[0] for c in (a, b)}
    expired = await states.wait_for(
        ConnectionState,
        lambda s: s.state is State.RECONNECTING and s.close_code == 4001,
        timeout=SETTLE,
    )
    assert expired.close_code == 4001
    for c in (a, b):
        await theirs[c].send(f"to {c}")
    for c, (handle, rec) in handles.items():
        got = await rec.wait_for(Message, timeout=SETTLE)
        assert got.content == f"to {c}" and rec.seqs() == [1]
        assert (await handle.send("back")).seq == 2
    assert conns.tokens_asked.get("cl-grace", 0) >= 1
    assert grace.state is State.OPEN
