"""Presence linger and read cursors against the real services, on the v1
endpoint with two edges: a quick reconnect is silent, a longer absence is
announced once, a killed edge's users are announced once after the rejoin
grace and the linger; a read reaches the reader's other devices on another
edge at once and the other members as coalesced receipts; sending a
message moves the sender's cursor."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import GENEROUS_LIMITS
from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack
from waddle_pb import store_pb2, store_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

LINGER = 1.5
GRACE = 1.0
ENV = {
    **GENEROUS_LIMITS,
    "WADDLE_PRESENCE_LINGER_SECONDS": str(LINGER),
    "WADDLE_REJOIN_GRACE_SECONDS": str(GRACE),
}
# Timers fire on time give or take the event loop's resolution.
SLACK = 0.1


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("reads"), edges=2, env=ENV) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def cid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def join(
    http: aiohttp.ClientSession, stack: Stack, channel_id: str, user: str, edge: int = 0
) -> tuple[WsClient, dict[str, Any]]:
    client = await WsClient.connect(
        http, stack.ws_url(channel_id, edge=edge), token=stack.token(user)
    )
    state = await client.recv()
    assert state["type"] == "initial_state", state
    return client, state


def online(state: dict[str, Any]) -> set[str]:
    return {u["userId"] for u in state["onlineUsers"]}


def of(client: WsClient, kind: str, user: str) -> list[dict[str, Any]]:
    """Frames of ``kind`` about ``user`` this client has received so far."""
    return [f for f in client.received if f["type"] == kind and f.get("userId") == user]


async def until(
    client: WsClient, check: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """The next frame satisfying ``check`` (others are kept in ``received``)."""
    async with asyncio.timeout(timeout):
        while True:
            frame = await client.recv(timeout)
            if check(frame):
                return frame


async def channel_counter(stack: Stack, name: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.metrics_urls()["channel"]) as resp,
    ):
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


async def stored_cursor(stack: Stack, user: str, channel_id: str, want: int) -> int:
    """The store's cursor once it reaches ``want`` (bounded wait: writes are batched)."""
    seq = 0
    async with grpc.aio.insecure_channel(stack.store_address) as ch:
        stub = store_pb2_grpc.StoreServiceStub(ch)
        for _ in range(100):
            got = await stub.GetReadCursor(
                store_pb2.GetReadCursorRequest(user_id=user, channel_id=channel_id), timeout=5
            )
            seq = got.seq
            if seq >= want:
                break
            await asyncio.sleep(0.05)
    return seq


async def post(client: WsClient, n: int) -> None:
    for i in range(n):
        await client.send({"type": "message", "content": f"m{i}"})
    for _ in range(n):
        await client.recv_type("ack")


# -- presence linger ---------------------------------------------------------


async def test_a_reconnect_within_the_linger_is_silent(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    channel_id = cid("blip")
    watcher, _ = await join(http, stack, channel_id, "walt", edge=0)
    ann, _ = await join(http, stack, channel_id, "ann", edge=1)
    bob, _ = await join(http, stack, channel_id, "bob", edge=0)
    await ann.send({"type": "typing", "isTyping": True})
    assert (await watcher.recv_type("typing"))["isTyping"] is True
    await ann.close()
    # The owner handled the departure: typing stops at once.
    stopped = await watcher.recv_type("typing")
    assert stopped["userId"] == "ann" and stopped["isTyping"] is False
    back, state = await join(http, stack, channel_id, "ann", edge=0)  # the other edge
    assert online(state) == {"walt", "ann", "bob"}
    await bob.close()
    # bob left after ann did: were ann's departure announced, it came first.
    gone = await watcher.recv_type("user_disconnected")
    assert gone["userId"] == "bob" and gone["channelId"] == channel_id
    assert not of(watcher, "user_disconnected", "ann"), "no flapping"
    assert not of(watcher, "user_connected", "ann")[1:], "no second user_connected"
    for c in (watcher, back):
        await c.close()


async def test_an_absence_longer_than_the_linger_is_announced_once(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    expired_before = await channel_counter(stack, "waddle_channel_linger_expirations_total")
    channel_id = cid("away")
    watcher, _ = await join(http, stack, channel_id, "walt", edge=0)
    ann, _ = await join(http, stack, channel_id, "ann", edge=1)
    await ann.send({"type": "typing", "isTyping": True})
    await watcher.recv_type("typing")
    left_at = time.monotonic()
    await ann.close()
    assert (await watcher.recv_type("typing"))["isTyping"] is False
    assert time.monotonic() - left_at < LINGER, "typing stops at once, not after the linger"
    # While ann lingers she is still online for a newcomer.
    nina, state = await join(http, stack, channel_id, "nina", edge=1)
    assert online(state) == {"walt", "ann", "nina"}
    gone = await watcher.recv_type("user_disconnected")
    assert gone == {
        "type": "user_disconnected",
        "channelId": channel_id,
        "userId": "ann",
        "username": "ann",
    }
    assert time.monotonic() - left_at >= LINGER - SLACK
    await nina.close()
    assert (await watcher.recv_type("user_disconnected"))["userId"] == "nina"
    assert len(of(watcher, "user_disconnected", "ann")) == 1, "announced exactly once"
    expired = await channel_counter(stack, "waddle_channel_linger_expirations_total")
    assert expired - expired_before >= 2
    await watcher.close()


async def test_a_killed_edge_is_announced_once_after_grace_and_linger(
    tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession
) -> None:
    async with start_stack(tmp_path_factory.mktemp("edge-kill"), edges=2, env=ENV) as stack:
        channel_id = cid("killed")
        watcher, _ = await join(http, stack, channel_id, "walt", edge=0)
        carl, _ = await join(http, stack, channel_id, "carl", edge=0)
        doomed = [
            (await join(http, stack, channel_id, user, edge=1))[0] for user in ("ann", "ann", "zed")
        ]
        killed_at = time.monotonic()
        await stack.edges[1].kill()
        announced: dict[str, float] = {}
        while len(announced) < 2:
            frame = await watcher.recv_type("user_disconnected", timeout=15)
            announced[frame["userId"]] = time.monotonic() - killed_at
        assert set(announced) == {"ann", "zed"}
        assert min(announced.values()) >= GRACE + LINGER - SLACK, announced
        await carl.close()
        assert (await watcher.recv_type("user_disconnected"))["userId"] == "carl"
        for user in ("ann", "zed"):
            assert len(of(watcher, "user_disconnected", user)) == 1, user
        for c in (watcher, *doomed):
            await c.close()


# -- read cursors ------------------------------------------------------------


async def test_a_read_reaches_the_readers_other_device_on_another_edge(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    channel_id = cid("reads")
    bob, _ = await join(http, stack, channel_id, "bob", edge=0)
    await post(bob, 5)
    phone, state = await join(http, stack, channel_id, "ann", edge=0)
    laptop, _ = await join(http, stack, channel_id, "ann", edge=1)
    assert state["lastSeq"] == 5
    await phone.send({"type": "read", "seq": 3})
    assert await laptop.recv_type("read") == {
        "type": "read",
        "channelId": channel_id,
        "userId": "ann",
        "seq": 3,
    }
    await phone.send({"type": "read", "seq": 2})  # behind the cursor: nothing moves
    await phone.send({"type": "read", "seq": 99})  # past the head: clamped
    assert (await laptop.recv_type("read"))["seq"] == 5
    assert [f["seq"] for f in of(laptop, "read", "ann")] == [3, 5]
    # Receipts for the other member: the first at once, the newest last.
    await until(bob, lambda f: f["type"] == "read" and f["userId"] == "ann" and f["seq"] == 5)
    assert [f["seq"] for f in of(bob, "read", "ann")] == [3, 5]
    # The reader's own connection is not told: by the time it has the next
    # message, anything the owner sent it before has arrived.
    await bob.send({"type": "message", "content": "after"})
    assert (await phone.recv_message())["seq"] == 6
    assert not of(phone, "read", "ann")
    assert await stored_cursor(stack, "ann", channel_id, 5) == 5
    for c in (bob, phone, laptop):
        await c.close()


async def test_ten_reads_in_a_second_give_at_most_two_receipts(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    receipts_before = await channel_counter(stack, "waddle_channel_read_receipts_total")
    persisted_before = await channel_counter(stack, "waddle_channel_reads_persisted_total")
    channel_id = cid("receipts")
    poster, _ = await join(http, stack, channel_id, "poster", edge=0)
    await post(poster, 10)
    bob, _ = await join(http, stack, channel_id, "bob", edge=0)
    ann, _ = await join(http, stack, channel_id, "ann", edge=1)
    started = time.monotonic()
    for seq in range(1, 11):
        await ann.send({"type": "read", "seq": seq})
    assert time.monotonic() - started < 1.0
    await until(bob, lambda f: f["type"] == "read" and f["userId"] == "ann" and f["seq"] == 10)
    seqs = [f["seq"] for f in of(bob, "read", "ann")]
    assert len(seqs) <= 2 and seqs[-1] == 10 and seqs == sorted(seqs), seqs
    assert await stored_cursor(stack, "ann", channel_id, 10) == 10
    receipts = await channel_counter(stack, "waddle_channel_read_receipts_total")
    persisted = await channel_counter(stack, "waddle_channel_reads_persisted_total")
    assert receipts > receipts_before and persisted > persisted_before
    for c in (poster, bob, ann):
        await c.close()


async def test_sending_a_message_moves_the_senders_cursor(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    channel_id = cid("sender")
    bob, _ = await join(http, stack, channel_id, "bob", edge=1)
    await post(bob, 2)
    phone, _ = await join(http, stack, channel_id, "ann", edge=0)
    laptop, _ = await join(http, stack, channel_id, "ann", edge=1)
    await phone.send({"type": "message", "content": "hi", "clientMsgId": "c1"})
    ack = await phone.recv_type("ack")
    assert ack["seq"] == 3 and ack["channelId"] == channel_id
    # The sender's other device at once, the other member as a receipt.
    assert (await laptop.recv_type("read"))["seq"] == 3
    receipt = await until(bob, lambda f: f["type"] == "read" and f["userId"] == "ann")
    assert receipt == {"type": "read", "channelId": channel_id, "userId": "ann", "seq": 3}
    assert await stored_cursor(stack, "ann", channel_id, 3) == 3
    # The sending connection has its ack instead of a read frame.
    await bob.send({"type": "message", "content": "reply"})
    assert (await phone.recv_message())["seq"] == 4
    assert not of(phone, "read", "ann")
    for c in (bob, phone, laptop):
        await c.close()
