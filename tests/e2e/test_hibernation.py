"""Hibernation against the real services, with a short idle period and two
edges: an idle channel falls asleep without a frame to anyone; any event,
sent by a member on the other edge, wakes it invisibly; after a wake a new
member sees everyone, ``seq`` continues and presence status survives; a
shard restart while channels sleep takes them over asleep without loading
them; an edge that dies while its channels sleep has its users announced
gone; and 200 sleeping channels woken at once all deliver."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import GENEROUS_LIMITS
from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

IDLE = 0.5
LINGER = 0.3
GRACE = 1.0
ENV = {
    **GENEROUS_LIMITS,
    "WADDLE_CHANNEL_IDLE_SECONDS": str(IDLE),
    "WADDLE_PRESENCE_LINGER_SECONDS": str(LINGER),
    "WADDLE_REJOIN_GRACE_SECONDS": str(GRACE),
}
# No frame may arrive while a channel sleeps or wakes: how long a client
# listens for one that should not come.
QUIET = 0.3


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("hibernation"), edges=2, env=ENV) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # Hundreds of sockets at once: no pool limit.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


def cid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def join(
    http: aiohttp.ClientSession, stack: Stack, channel_id: str, user: str, edge: int
) -> tuple[WsClient, dict[str, Any]]:
    client = await WsClient.connect(
        http, stack.ws_url(channel_id, edge=edge), token=stack.token(user)
    )
    state = await client.recv()
    assert state["type"] == "initial_state", state
    return client, state


async def shard_metrics(stack: Stack) -> dict[str, float]:
    """The channel shard's samples by name (labels joined in: ``name{k=v}``)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.metrics_urls()["channel"]) as resp,
    ):
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def until_metrics(
    stack: Stack, want: dict[str, float], timeout: float = 15.0
) -> dict[str, float]:
    """Poll the shard's metrics until every name in ``want`` has its value."""
    seen: dict[str, float] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                seen = await shard_metrics(stack)
                if all(seen.get(k) == v for k, v in want.items()):
                    return seen
                await asyncio.sleep(0.05)
    except TimeoutError:
        got = {k: seen.get(k) for k in want}
        raise AssertionError(f"shard metrics never reached {want}: {got}") from None


async def all_asleep(stack: Stack, channels: int | None = None) -> dict[str, float]:
    """Wait until no channel is awake (and, if given, ``channels`` are asleep)."""
    want = {"waddle_channel_active_channels": 0.0}
    if channels is not None:
        want["waddle_channel_hibernated_channels"] = float(channels)
    return await until_metrics(stack, want)


WAKES = "waddle_channel_wakes_total{reason=event}"


async def nothing_arrives(client: WsClient) -> None:
    with pytest.raises(TimeoutError):
        frame = await client.recv(timeout=QUIET)
        raise AssertionError(f"unexpected frame while asleep: {frame}")


async def post(client: WsClient, content: str) -> int:
    """Send a message; return its seq once acked (the echo is consumed too)."""
    await client.send({"type": "message", "content": content})
    ack = await client.recv_type("ack")
    return int(ack["seq"])


@pytest.mark.parametrize("kind", ["message", "typing", "presence", "join", "leave", "read", "sync"])
async def test_each_event_wakes_a_sleeping_channel_invisibly(
    stack: Stack, http: aiohttp.ClientSession, kind: str
) -> None:
    channel_id = cid(f"wake-{kind}")
    ann, _ = await join(http, stack, channel_id, "ann", edge=0)
    bob, _ = await join(http, stack, channel_id, "bob", edge=1)
    assert (await ann.recv())["type"] == "user_connected"
    for i in (1, 2):
        assert await post(ann, f"m{i}") == i
        assert (await bob.recv_message())["seq"] == i
    ann.received.clear()
    before = await all_asleep(stack)
    assert before["waddle_channel_hibernations_total"] >= 1
    await nothing_arrives(ann)

    # The member on the other edge acts; the first frame ann gets is its effect.
    woke = 1
    match kind:
        case "message":
            await bob.send({"type": "message", "content": "after sleep", "clientMsgId": "k"})
            got = await ann.recv()
            assert got["type"] == "message" and got["message"]["seq"] == 3
            assert got["message"]["content"] == "after sleep"
            ack = await bob.recv_type("ack")
            assert ack["seq"] == 3 and ack["clientMsgId"] == "k"
        case "typing":
            await bob.send({"type": "typing", "isTyping": True})
            got = await ann.recv()
            assert got["type"] == "typing" and got["userId"] == "bob" and got["isTyping"] is True
        case "presence":
            await bob.send({"type": "presence", "status": "dnd"})
            got = await ann.recv()
            assert got["type"] == "presence" and got["userId"] == "bob"
            assert got["status"] == "dnd"
        case "join":
            cat, state = await join(http, stack, channel_id, "cat", edge=1)
            assert {u["userId"] for u in state["onlineUsers"]} == {"ann", "bob", "cat"}
            assert state["lastSeq"] == 2 and [m["seq"] for m in state["messages"]] == [1, 2]
            got = await ann.recv()
            assert got["type"] == "user_connected" and got["userId"] == "cat"
            await cat.close()
        case "leave":
            await bob.close()
            got = await ann.recv(timeout=5)
            assert got["type"] == "user_disconnected" and got["userId"] == "bob"
        case "read":
            await bob.send({"type": "read", "channelId": channel_id, "seq": 2})
            got = await ann.recv()
            assert got["type"] == "read" and got["userId"] == "bob" and got["seq"] == 2
        case "sync":
            # Replay is the edge's and the store's: it needs no owner and wakes none.
            woke = 0
            # (bob has seq 1 and 2 already: the edge sends him nothing twice.
            # ann's second read receipt, coalesced, may come first.)
            await bob.send({"type": "sync", "afterSeq": 0})
            done = await bob.recv_type("sync_complete")
            assert done["type"] == "sync_complete" and done["lastSeq"] == 2
    after = await shard_metrics(stack)
    assert after[WAKES] - before[WAKES] == woke

    # The channel goes on: the next message continues the sequence for both.
    seq = await post(ann, "go on")
    assert seq == (4 if kind == "message" else 3)
    if kind != "leave":
        assert (await bob.recv_message())["seq"] == seq
    kinds = {f["type"] for f in ann.received}
    assert not kinds & {"user_connected", "user_disconnected"} - (
        {"user_connected"}
        if kind == "join"
        else {"user_disconnected"}
        if kind == "leave"
        else set()
    ), "no presence flapping"
    await ann.close()
    await bob.close()


async def test_after_a_wake_a_newcomer_sees_everyone_with_their_status(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    channel_id = cid("newcomer")
    ann, _ = await join(http, stack, channel_id, "ann", edge=0)
    bob, _ = await join(http, stack, channel_id, "bob", edge=1)
    bob2, _ = await join(http, stack, channel_id, "bob", edge=0)  # a second device
    await ann.send({"type": "presence", "status": "away"})
    assert (await bob.recv_type("presence"))["status"] == "away"
    for i in range(1, 4):
        assert await post(bob, f"m{i}") == i
    await all_asleep(stack)

    cat, state = await join(http, stack, channel_id, "cat", edge=1)
    users = {u["userId"]: u for u in state["onlineUsers"]}
    assert set(users) == {"ann", "bob", "cat"}
    assert users["ann"]["status"] == "away" and users["bob"]["status"] == "online"
    assert state["onlineCount"] == 3
    assert state["lastSeq"] == 3 and [m["seq"] for m in state["messages"]] == [1, 2, 3]
    assert await post(cat, "hi") == 4
    for client in (ann, bob, bob2):
        seqs = [(await client.recv_message())["seq"] for _ in range(4 - len(client.seqs()))]
        assert client.seqs() == [1, 2, 3, 4], seqs
    for client in (ann, bob, bob2, cat):
        await client.close()


async def test_two_hundred_sleeping_channels_woken_at_once(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    n = 200
    channels = [cid(f"many{i}") for i in range(n)]
    pairs: list[tuple[WsClient, WsClient]] = []
    for i, channel_id in enumerate(channels):
        a, _ = await join(http, stack, channel_id, f"a{i}", edge=0)
        b, _ = await join(http, stack, channel_id, f"b{i}", edge=1)
        pairs.append((a, b))
    await asyncio.gather(*(post(a, "first") for a, _ in pairs))
    before = await all_asleep(stack)
    assert before["waddle_channel_hibernated_channels"] >= n

    for i, (_, b) in enumerate(pairs):
        await b.send({"type": "message", "content": f"wake {i}"})

    async def delivered(i: int, a: WsClient) -> None:
        got = await a.recv_type("message", timeout=20)
        assert got["message"]["seq"] == 2 and got["message"]["content"] == f"wake {i}"

    await asyncio.gather(*(delivered(i, a) for i, (a, _) in enumerate(pairs)))
    after = await shard_metrics(stack)
    assert after[WAKES] - before[WAKES] == n
    assert (
        after["waddle_channel_wake_seconds_count"] - before["waddle_channel_wake_seconds_count"]
        >= n
    )
    await asyncio.gather(*(c.close() for pair in pairs for c in pair))


async def test_a_shard_restart_takes_sleeping_channels_over_without_loading_them(
    tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession
) -> None:
    async with start_stack(tmp_path_factory.mktemp("hib-restart"), edges=2, env=ENV) as stack:
        n = 20
        rooms: list[tuple[str, WsClient, WsClient]] = []
        for i in range(n):
            channel_id = cid(f"restart{i}")
            a, _ = await join(http, stack, channel_id, f"a{i}", edge=0)
            b, _ = await join(http, stack, channel_id, f"b{i}", edge=1)
            await b.send({"type": "presence", "status": "away"})
            await post(a, "before")
            rooms.append((channel_id, a, b))
        await all_asleep(stack, channels=n)

        await stack.restart_channel(0, kill=True)
        # Both edges re-attach and re-register 2n connections: the new shard
        # holds every channel asleep and reads only their heads.
        taken = await until_metrics(
            stack,
            {
                "waddle_channel_hibernated_channels": float(n),
                "waddle_channel_takeovers_total": float(n),
                "waddle_channel_loads_total{kind=head}": float(n),
                "waddle_channel_members": float(2 * n),
            },
        )
        assert taken["waddle_channel_loads_total{kind=full}"] == 0
        assert taken["waddle_channel_active_channels"] == 0

        channel_id, a, b = rooms[0]
        await nothing_arrives(a)  # no presence storm, no frame at all
        await b.send({"type": "message", "content": "after restart"})
        got = await a.recv()
        assert got["type"] == "message" and got["message"]["seq"] == 2
        cat, state = await join(http, stack, channel_id, "cat", edge=0)
        users = {u["userId"]: u["status"] for u in state["onlineUsers"]}
        assert users == {"a0": "online", "b0": "away", "cat": "online"}
        assert state["lastSeq"] == 2
        for _, a, b in rooms:
            for client in (a, b):
                assert not client.ws.closed, "a shard restart dropped a client socket"
                assert not {f["type"] for f in client.received} & {"user_disconnected"}, (
                    "no presence flapping"
                )
        for client in (cat, *(c for _, a, b in rooms for c in (a, b))):
            await client.close()


async def test_an_edge_that_dies_while_its_channel_sleeps_has_its_users_announced(
    tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession
) -> None:
    async with start_stack(tmp_path_factory.mktemp("hib-edge"), edges=2, env=ENV) as stack:
        channel_id = cid("edge-dies")
        ann, _ = await join(http, stack, channel_id, "ann", edge=0)
        bob, _ = await join(http, stack, channel_id, "bob", edge=1)
        assert (await ann.recv())["type"] == "user_connected"
        await post(ann, "before")
        before = await all_asleep(stack, channels=1)

        await stack.edges[1].kill()
        await bob.wait_closed(timeout=5)
        # After the rejoin grace the owner wakes the channel to tell ann.
        gone = await ann.recv(timeout=GRACE + LINGER + 10)
        assert gone["type"] == "user_disconnected" and gone["userId"] == "bob"
        after = await shard_metrics(stack)
        reason = "waddle_channel_wakes_total{reason=departures}"
        assert after[reason] - before[reason] == 1
        cat, state = await join(http, stack, channel_id, "cat", edge=0)
        assert {u["userId"] for u in state["onlineUsers"]} == {"ann", "cat"}
        for client in (ann, cat):
            await client.close()
