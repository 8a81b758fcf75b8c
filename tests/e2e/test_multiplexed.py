"""Protocol v1.1 against the real services: one socket, many channels.

Two edges and two channel shards, on SQLite and on PostgreSQL. Channels are
picked so that one socket's subscriptions live on both shards."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.e2e.conftest import GENEROUS_LIMITS, database
from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack
from waddle_common.routing import owner_of

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

ENV = {**GENEROUS_LIMITS, "WADDLE_MAX_SUBSCRIPTIONS": "5", "WADDLE_PRESENCE_LINGER_SECONDS": "1"}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgres"])
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"mux-{request.param}")
    async with (
        database(request.param) as url,
        start_stack(tmp, database_url=url, shards=2, edges=2, env=ENV) as s,
    ):
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def channels(stack: Stack, per_shard: int) -> list[str]:
    """Fresh channel ids, ``per_shard`` owned by each shard, interleaved."""
    shards = stack.shard_addresses
    found: dict[str, list[str]] = {s: [] for s in shards}
    while any(len(v) < per_shard for v in found.values()):
        cid = f"mx-{uuid.uuid4().hex[:8]}"
        owned = found[owner_of(cid, shards)]
        if len(owned) < per_shard:
            owned.append(cid)
    return [c for group in zip(*found.values(), strict=True) for c in group]


def mux_url(stack: Stack, edge: int = 0) -> str:
    return f"ws://127.0.0.1:{stack.edge_port(edge)}/websocket"


async def mux(
    http: aiohttp.ClientSession, stack: Stack, user: str, edge: int = 0, **claims: Any
) -> WsClient:
    return await WsClient.connect(http, mux_url(stack, edge), token=stack.token(user, **claims))


async def subscribe(client: WsClient, channel_id: str, **extra: Any) -> dict[str, Any]:
    await client.send({"type": "subscribe", "channelId": channel_id, **extra})
    return await client.recv_match(type="initial_state", channelId=channel_id)


async def post(client: WsClient, channel_id: str, content: str, **extra: Any) -> dict[str, Any]:
    key = uuid.uuid4().hex
    await client.send(
        {
            "type": "message",
            "channelId": channel_id,
            "content": content,
            "clientMsgId": key,
            **extra,
        }
    )
    return await client.recv_match(type="ack", clientMsgId=key)


async def test_one_socket_in_three_channels_on_two_shards(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    a, b, c = channels(stack, 2)[:3]
    assert len({owner_of(x, stack.shard_addresses) for x in (a, b, c)}) == 2
    alice = await mux(http, stack, "mx-alice")
    bob = await mux(http, stack, "mx-bob", edge=1)
    for ch in (a, b, c):
        state = await subscribe(alice, ch)
        assert state["channelId"] == ch and state["lastSeq"] == 0
        assert state["readSeq"] == 0 and state["unreadCount"] == 0
        assert state["onlineUsers"][0]["userId"] == "mx-alice"
        await subscribe(bob, ch)
    # Every frame names its channel; each channel has its own sequence.
    for i in range(3):
        for ch in (a, b, c):
            ack = await post(bob, ch, f"{ch}-{i}")
            assert ack["channelId"] == ch and ack["seq"] == i + 1
    for ch in (a, b, c):
        for i in range(3):
            frame = await alice.recv_match(type="message", channelId=ch)
            assert frame["message"]["content"] == f"{ch}-{i}"
    for ch in (a, b, c):
        assert alice.seqs(ch) == [1, 2, 3]
    # Typing and presence are per channel as well.
    await bob.send({"type": "typing", "channelId": b, "isTyping": True})
    typing = await alice.recv_match(type="typing")
    assert typing["channelId"] == b and typing["userId"] == "mx-bob"
    await alice.close()
    await bob.close()


async def test_subscribe_unsubscribe_and_refusals_per_channel(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    a, b, c, d, e, f = channels(stack, 3)
    client = await mux(http, stack, "mx-carol", channels=[a, b, c, d, e])
    # Not subscribed yet: refused, the socket stays open.
    await client.send({"type": "message", "channelId": a, "content": "early"})
    refused = await client.recv_match(type="error", channelId=a)
    assert refused["code"] == "not_subscribed"
    await client.send({"type": "subscribe", "channelId": f})  # not in the token's channels
    assert (await client.recv_match(type="error", channelId=f))["code"] == "forbidden"
    for ch in (a, b, c, d, e):
        await subscribe(client, ch)
    await client.send({"type": "subscribe", "channelId": a})
    assert (await client.recv_match(type="error", channelId=a))["code"] == "already_subscribed"
    # WADDLE_MAX_SUBSCRIPTIONS is 5 here.
    busy = await mux(http, stack, "mx-busy")
    many = channels(stack, 3)
    for ch in many[:5]:
        await subscribe(busy, ch)
    await busy.send({"type": "subscribe", "channelId": many[5]})
    refused = await busy.recv_match(type="error", channelId=many[5])
    assert refused["code"] == "too_many_subscriptions"
    await busy.close()
    await client.send({"type": "unsubscribe", "channelId": e})
    assert (await client.recv_match(type="unsubscribed"))["channelId"] == e
    await client.send({"type": "typing", "channelId": e, "isTyping": True})
    assert (await client.recv_match(type="error", channelId=e))["code"] == "not_subscribed"
    await client.send({"type": "unsubscribe", "channelId": e})
    assert (await client.recv_match(type="error", channelId=e))["code"] == "not_subscribed"
    # After an unsubscribe its messages stop, the others' go on.
    poster = await mux(http, stack, "mx-poster", edge=1)
    for ch in (a, e):
        await subscribe(poster, ch)
    await post(poster, e, "after unsubscribe")
    await post(poster, a, "still subscribed")
    got = await client.recv_match(type="message")
    assert got["channelId"] == a and got["message"]["content"] == "still subscribed"
    assert not [m for m in client.received if m["type"] == "message" and m["channelId"] == e]
    # Malformed frames name no channel; a bad channel id is refused as such.
    await client.send({"type": "subscribe", "channelId": "bad\nid"})
    bad = await client.recv_match(type="error")
    assert bad["code"] == "invalid_field" and "channelId" not in bad
    await client.send({"type": "ping"})
    await client.recv_match(type="pong")
    await client.close()
    await poster.close()


async def test_resume_after_an_edge_is_killed_is_gap_free_in_every_channel(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    chans = channels(stack, 2)[:3]
    reader = await mux(http, stack, "mx-reader")  # on edge 0, which is killed
    writer = await mux(http, stack, "mx-writer", edge=1)
    for ch in chans:
        await subscribe(reader, ch)
        await subscribe(writer, ch)
    for ch in chans:
        await post(writer, ch, "before")
        assert (await reader.recv_match(type="message", channelId=ch))["message"]["seq"] == 1
    last = {ch: 1 for ch in chans}
    await stack.restart_edge(0)
    assert await reader.wait_closed() is not None
    for ch in chans:  # missed while the reader was away
        for i in range(3):
            await post(writer, ch, f"missed {i}")
    reader2 = await mux(http, stack, "mx-reader")
    for ch in chans:
        state = await subscribe(reader2, ch, afterSeq=last[ch])
        assert state["messages"] == [] and state["lastSeq"] == 4
    for ch in chans:
        for seq in (2, 3, 4):
            replayed = await reader2.recv_match(type="message", channelId=ch)
            assert replayed["message"]["seq"] == seq
        done = await reader2.recv_match(type="sync_complete", channelId=ch)
        assert done["count"] == 3 and done["lastSeq"] == 4
        assert reader2.seqs(ch) == [2, 3, 4]
    # Live again in every channel, exactly once.
    for ch in chans:
        ack = await post(writer, ch, "live")
        got = await reader2.recv_match(type="message", channelId=ch)
        assert got["message"]["seq"] == ack["seq"] == 5
        assert reader2.seqs(ch) == [2, 3, 4, 5]
    await reader2.close()
    await writer.close()


async def test_a_shard_restart_leaves_the_other_channels_alone(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    shards = stack.shard_addresses
    chans = channels(stack, 1)
    on_first = next(ch for ch in chans if owner_of(ch, shards) == shards[0])
    on_second = next(ch for ch in chans if owner_of(ch, shards) == shards[1])
    client = await mux(http, stack, "mx-steady")
    writer = await mux(http, stack, "mx-steady-writer", edge=1)
    for ch in (on_first, on_second):
        await subscribe(client, ch)
        await subscribe(writer, ch)
    restart = asyncio.ensure_future(stack.restart_channel(0))
    # The other shard's channel keeps working meanwhile.
    for i in range(5):
        await post(writer, on_second, f"steady {i}")
    await restart
    for i in range(5):
        got = await client.recv_match(type="message", channelId=on_second)
        assert got["message"]["content"] == f"steady {i}"
    # The restarted shard's channel resumes on the same socket, silently.
    ack = await post(writer, on_first, "after the restart")
    got = await client.recv_match(type="message", channelId=on_first)
    assert got["message"]["seq"] == ack["seq"]
    assert not [f for f in client.received if f["type"] in ("user_disconnected", "error")]
    await client.close()
    await writer.close()


async def test_history_pages_backwards_and_follows_threads(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    ch = channels(stack, 1)[0]
    client = await mux(http, stack, "mx-historian")
    await subscribe(client, ch)
    root = await post(client, ch, "root")
    for i in range(1, 121):
        if i % 10 == 0:
            await post(client, ch, f"reply {i}", threadId=root["id"])
        else:
            await post(client, ch, f"m{i}")
    # 121 messages: pages of 50 from the newest, then the rest.
    pages: list[dict[str, Any]] = []
    before: int | None = None
    while True:
        req: dict[str, Any] = {"type": "history", "channelId": ch, "limit": 50}
        if before is not None:
            req["beforeSeq"] = before
        await client.send(req)
        page = await client.recv_match(type="history", channelId=ch)
        pages.append(page)
        seqs = [m["seq"] for m in page["messages"]]
        assert seqs == sorted(seqs), "oldest first within a page"
        if not page["hasMore"]:
            break
        before = seqs[0]
    assert [len(p["messages"]) for p in pages] == [50, 50, 21]
    every = [m["seq"] for p in reversed(pages) for m in p["messages"]]
    assert every == list(range(1, 122))
    assert pages[-1]["messages"][0]["replyCount"] == 12, "the root counts its replies"
    # One thread, in pages of 5.
    await client.send({"type": "history", "channelId": ch, "threadId": root["id"], "limit": 5})
    newest = await client.recv_match(type="history", channelId=ch)
    assert [m["content"] for m in newest["messages"]] == [
        f"reply {i}" for i in (80, 90, 100, 110, 120)
    ]
    assert newest["hasMore"] and newest["threadId"] == root["id"]
    await client.send(
        {
            "type": "history",
            "channelId": ch,
            "threadId": root["id"],
            "beforeSeq": newest["messages"][0]["seq"],
            "limit": 100,
        }
    )
    older = await client.recv_match(type="history", channelId=ch)
    assert len(older["messages"]) == 7 and not older["hasMore"]
    # Bad arguments are refused with the channel named.
    await client.send({"type": "history", "channelId": ch, "limit": 500})
    err = await client.recv_match(type="error", channelId=ch)
    assert err["code"] == "invalid_field"
    await client.close()


async def test_read_cursors_follow_the_user_across_devices(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    ch = channels(stack, 1)[0]
    writer = await mux(http, stack, "mx-chatty", edge=1)
    await subscribe(writer, ch)
    for i in range(10):
        await post(writer, ch, f"m{i}")
    phone = await mux(http, stack, "mx-reader2", edge=0)
    laptop = await mux(http, stack, "mx-reader2", edge=1)
    state = await subscribe(phone, ch)
    assert state["readSeq"] == 0 and state["unreadCount"] == 10
    await subscribe(laptop, ch)
    await phone.send({"type": "read", "channelId": ch, "seq": 7})
    mine = await laptop.recv_match(type="read", channelId=ch, userId="mx-reader2")
    assert mine["seq"] == 7
    # Never back: an older read changes nothing.
    await phone.send({"type": "read", "channelId": ch, "seq": 3})
    await phone.send({"type": "read", "channelId": ch, "seq": 9})
    assert (await laptop.recv_match(type="read", channelId=ch, userId="mx-reader2"))["seq"] == 9
    # A third device starts from the stored cursor.
    tablet = await mux(http, stack, "mx-reader2")
    state = await subscribe(tablet, ch)
    assert state["readSeq"] == 9 and state["unreadCount"] == 1
    # Sending a message moves the sender's own cursor to it.
    ack = await post(laptop, ch, "my own")
    assert (await phone.recv_match(type="read", channelId=ch, seq=ack["seq"]))["seq"] == 11
    for c in (writer, phone, laptop, tablet):
        await c.close()


async def test_a_crowd_joining_is_a_few_presence_diffs_and_messages_do_not_wait(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    ch = channels(stack, 1)[0]
    watcher = await mux(http, stack, "mx-watcher")
    await subscribe(watcher, ch)
    speaker = await mux(http, stack, "mx-speaker", edge=1)
    await subscribe(speaker, ch)
    first = await watcher.recv_match(type="presence_diff", channelId=ch)
    assert [j["userId"] for j in first["joins"]] == ["mx-speaker"]
    crowd_size = 30

    async def join(i: int) -> WsClient:
        member = await mux(http, stack, f"mx-crowd-{i}", edge=i % 2)
        await subscribe(member, ch)
        return member

    crowd = await asyncio.gather(*(join(i) for i in range(crowd_size)))
    ack = await post(speaker, ch, "during the crowd")
    got = await watcher.recv_match(type="message", channelId=ch)
    assert got["message"]["seq"] == ack["seq"]
    joined: set[str] = set()
    diffs = 0
    while len(joined) < crowd_size:
        diff = await watcher.recv_match(type="presence_diff", channelId=ch)
        diffs += 1
        assert diff["leaves"] == []
        joined.update(j["userId"] for j in diff["joins"])
    assert joined == {f"mx-crowd-{i}" for i in range(crowd_size)}
    # Each edge sends at most one diff per 100 ms window: far fewer than 30.
    assert diffs < crowd_size // 2, diffs
    assert not [f for f in watcher.received if f["type"] == "user_connected"]
    for member in crowd:
        await member.close()
    left: set[str] = set()
    while len(left) < crowd_size:
        diff = await watcher.recv_match(type="presence_diff", channelId=ch)
        left.update(v["userId"] for v in diff["leaves"])
    await watcher.close()
    await speaker.close()


async def test_a_draining_edge_closes_every_multiplexed_socket_with_1012(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    idle = await mux(http, stack, "mx-idle", edge=1)  # no subscription at all
    busy = await mux(http, stack, "mx-busy-drain", edge=1)
    await subscribe(busy, channels(stack, 1)[0])
    restart = asyncio.ensure_future(stack.restart_edge(1, kill=False))
    assert await idle.wait_closed(timeout=20) == 1012
    assert await busy.wait_closed(timeout=20) == 1012
    await restart


async def test_after_an_edge_restart_each_message_keeps_its_author(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """The owner keeps a restarted edge's old connections for the rejoin
    grace; new connections of that edge must never be taken for them."""
    ch = channels(stack, 1)[0]
    watcher = await mux(http, stack, "mx-author-watch", edge=1)
    await subscribe(watcher, ch)
    url = stack.ws_url(ch, edge=0)
    first = [await WsClient.connect(http, url, token=stack.token(u)) for u in ("ann", "ben")]
    await stack.restart_edge(0)
    for client in first:
        await client.wait_closed()
    # Reconnect in the other order: ben first, then ann.
    again = {u: await WsClient.connect(http, url, token=stack.token(u)) for u in ("ben", "ann")}
    for user, client in again.items():
        assert (await client.recv())["type"] == "initial_state"
        await client.send({"type": "message", "content": f"I am {user}"})
        await client.recv_type("ack")
    for _ in again:
        got = (await watcher.recv_match(type="message", channelId=ch))["message"]
        assert got["content"] == f"I am {got['userId']}", got
    for client in (*again.values(), watcher):
        await client.close()
