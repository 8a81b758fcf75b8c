"""The client protocol end to end: real store, channel and edge processes,
real WebSocket clients, every frame type, refusal and error of DESIGN.md."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import grpc
import jwt
import pytest

from tests.support.client import Closed, WsClient
from tests.support.stack import Stack
from waddle_pb import store_pb2, store_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


def channel(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def join(
    http: aiohttp.ClientSession, stack: Stack, channel_id: str, user: str, **kw: object
) -> tuple[WsClient, dict[str, Any]]:
    client = await WsClient.connect(http, stack.ws_url(channel_id), token=stack.token(user, **kw))  # type: ignore[arg-type]
    first = await client.recv()
    assert first["type"] == "initial_state", first
    return client, first


async def store_messages(stack: Stack, channel_id: str) -> list[store_pb2.StoredMessage]:
    async with grpc.aio.insecure_channel(stack.store_address) as ch:
        stub = store_pb2_grpc.StoreServiceStub(ch)
        page = await stub.MessagesAfter(
            store_pb2.MessagesAfterRequest(channel_id=channel_id, after_seq=0, limit=1000),
            timeout=5,
        )
        return list(page.messages)


async def test_initial_state_then_message_to_everyone_and_ack_to_sender(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid = channel("general")
    alice, state = await join(http, stack, cid, "alice", avatar_url="https://img/a.png")
    assert state["channelId"] == cid
    assert state["lastSeq"] == 0 and state["messages"] == []
    assert [u["userId"] for u in state["onlineUsers"]] == ["alice"]
    bob, state_b = await join(http, stack, cid, "bob")
    online = {u["userId"]: u for u in state_b["onlineUsers"]}
    assert set(online) == {"alice", "bob"} and online["alice"]["status"] == "online"
    assert isinstance(online["alice"]["joinedAt"], int)
    joined = await alice.recv()
    assert joined == {
        "type": "user_connected",
        "channelId": cid,
        "userId": "bob",
        "username": "bob",
    }

    await alice.send(
        {"type": "message", "content": "hello", "clientMsgId": "m-1", "threadId": "t1"}
    )
    mine_frame = await alice.recv_type("message")
    mine = mine_frame["message"]
    assert mine_frame["channelId"] == cid, "every frame about a channel names it"
    ack = await alice.recv_type("ack")
    theirs = await bob.recv_message()
    assert mine == theirs
    assert mine["seq"] == 1 and mine["content"] == "hello" and mine["threadId"] == "t1"
    assert mine["userId"] == "alice" and mine["username"] == "alice" and mine["channelId"] == cid
    assert abs(mine["timestamp"] - time.time() * 1000) < 60_000
    assert ack == {
        "type": "ack",
        "channelId": cid,
        "clientMsgId": "m-1",
        "id": mine["id"],
        "seq": 1,
        "timestamp": mine["timestamp"],
    }
    await bob.send({"type": "message", "content": "hi alice"})
    assert (await alice.recv_message())["seq"] == 2
    ack_b = await bob.recv_type("ack")
    assert ack_b["clientMsgId"] is None and ack_b["seq"] == 2

    # Durable before broadcast: the store has exactly these two.
    stored = await store_messages(stack, cid)
    assert [(m.seq, m.content, m.user_id) for m in stored] == [
        (1, "hello", "alice"),
        (2, "hi alice", "bob"),
    ]
    # A newcomer's initial_state carries the history, oldest first, with avatars.
    carol, state_c = await join(http, stack, cid, "carol")
    msgs = state_c["messages"]
    assert [m["content"] for m in msgs] == ["hello", "hi alice"]
    assert msgs[0]["avatarUrl"] == "https://img/a.png" and msgs[0]["username"] == "alice"
    assert state_c["lastSeq"] == 2
    for c in (alice, bob, carol):
        await c.close()


async def test_initial_state_holds_at_most_50_recent_messages(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid = channel("busy")
    alice, _ = await join(http, stack, cid, "alice")
    for i in range(60):
        await alice.send({"type": "message", "content": f"m{i}"})
    for _ in range(60):
        await alice.recv_type("ack")
    bob, state = await join(http, stack, cid, "bob")
    contents = [m["content"] for m in state["messages"]]
    assert contents == [f"m{i}" for i in range(10, 60)]
    assert state["lastSeq"] == 60
    await alice.close()
    await bob.close()


async def test_browser_subprotocol_auth_selects_waddle_and_never_echoes_token(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    token = stack.token("dana")
    ws = await http.ws_connect(
        stack.ws_url(channel("b")), protocols=("waddle.v1", f"bearer.{token}")
    )
    assert ws.protocol == "waddle.v1"
    assert token not in str(ws._response.headers)
    first = await ws.receive_json(timeout=10)
    assert first["type"] == "initial_state"
    await ws.close()


@pytest.mark.parametrize(
    ("make_headers", "status", "body"),
    [
        (lambda s: {}, 401, "Unauthorized"),
        (lambda s: {"Authorization": "Bearer not-a-jwt"}, 401, "Unauthorized"),
        (
            lambda s: {
                "Authorization": "Bearer "
                + jwt.encode(
                    {"sub": "x", "permissions": ["read"], "exp": int(time.time()) + 60},
                    "some-other-secret-0123456789abcdef",
                    algorithm="HS256",
                )
            },
            401,
            "Unauthorized",
        ),
        (lambda s: {"Authorization": "Bearer " + s.token("x", ttl=-120)}, 401, "Unauthorized"),
        (
            lambda s: {
                "Authorization": "Bearer "
                + jwt.encode({"sub": "x", "permissions": ["read"]}, s.jwt_secret, algorithm="HS256")
            },
            401,
            "Unauthorized",
        ),
        (
            lambda s: {"Authorization": "Bearer " + s.token("x", permissions=["write"])},
            403,
            "Forbidden",
        ),
        (
            lambda s: {"Authorization": "Bearer " + s.token("x", channels=["elsewhere"])},
            403,
            "Forbidden",
        ),
    ],
    ids=["missing", "garbage", "bad-signature", "expired", "no-exp", "no-read", "channel-claim"],
)
async def test_refusals_before_upgrade(
    stack: Stack, http: aiohttp.ClientSession, make_headers: object, status: int, body: str
) -> None:
    headers = make_headers(stack)  # type: ignore[operator]
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(stack.ws_url(channel("r")), headers=headers)
    assert info.value.status == status
    async with http.get(
        stack.ws_url(channel("r")).replace("ws://", "http://"),
        headers={
            **headers,
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as resp:
        assert resp.status == status
        assert (await resp.text()).strip() == body


async def test_channel_claim_allows_listed_channel(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid = channel("allowed")
    client, _ = await join(http, stack, cid, "erin", channels=[cid])
    await client.close()


async def test_channel_full_is_503_with_retry_after(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid = channel("tiny")
    async with grpc.aio.insecure_channel(stack.store_address) as ch:
        await store_pb2_grpc.StoreServiceStub(ch).UpdateChannelSettings(
            store_pb2.ChannelSettings(channel_id=cid, max_connections=2), timeout=5
        )
    a, _ = await join(http, stack, cid, "a")
    b, _ = await join(http, stack, cid, "b")
    async with http.get(
        stack.ws_url(cid).replace("ws://", "http://"),
        headers={
            "Authorization": "Bearer " + stack.token("c"),
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as resp:
        assert resp.status == 503
        assert (await resp.text()).strip() == "Channel full"
        assert int(resp.headers["Retry-After"]) > 0
    # A place frees up when someone leaves.
    await b.close()
    await a.send({"type": "ping"})
    c: WsClient | None = None
    async with asyncio.timeout(10):
        while c is None:
            try:
                c, _ = await join(http, stack, cid, "c")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 503
                await asyncio.sleep(0.1)  # the leave travels to the owner; retry
    await a.close()
    await c.close()


async def test_write_permission_required(stack: Stack, http: aiohttp.ClientSession) -> None:
    cid = channel("ro")
    reader, _ = await join(http, stack, cid, "reader", permissions=["read"])
    writer, _ = await join(http, stack, cid, "writer")
    await reader.send({"type": "message", "content": "let me in", "clientMsgId": "x1"})
    err = await reader.recv_type("error")
    assert err["message"] == "No write permission" and err["code"] == "no_write_permission"
    assert err["clientMsgId"] == "x1"
    # Still connected and still receiving.
    await writer.send({"type": "message", "content": "still here?"})
    assert (await reader.recv_message())["content"] == "still here?"
    assert [m.content for m in await store_messages(stack, cid)] == ["still here?"]
    await reader.close()
    await writer.close()


@pytest.mark.parametrize(
    ("raw", "message", "code"),
    [
        ("{not json", "Invalid message format", "invalid_format"),
        ("[1, 2]", "Invalid message format", "invalid_format"),
        ('{"content": "no type"}', "Invalid message format: type must be a string", "invalid_format"),
        ('{"type": "dance"}', "Unknown message type", "unknown_type"),
        ('{"type": "message"}', "Invalid field: content must be a string", "invalid_field"),
        ('{"type": "message", "content": 5}', "Invalid field: content must be a string", "invalid_field"),
        ('{"type": "message", "content": "   "}', "Message is empty", "empty_message"),
        ('{"type": "message", "content": "' + "x" * 4001 + '"}', "Message too long: at most 4000 characters", "message_too_long"),
        ('{"type": "message", "content": "a", "threadId": 7}', "Invalid field: threadId must be a string or null", "invalid_field"),
        ('{"type": "typing", "isTyping": "yes"}', "Invalid field: isTyping must be a boolean", "invalid_field"),
        ('{"type": "presence", "status": "asleep"}', "Invalid field: status must be one of away, dnd, online", "invalid_field"),
        ('{"type": "sync", "afterSeq": -1}', "Invalid field: afterSeq must be a non-negative integer", "invalid_field"),
        ('{"type": "sync"}', "Invalid field: sync needs afterSeq or afterMessageId", "invalid_field"),
    ],
    ids=[
        "bad-json", "not-object", "no-type", "unknown-type", "no-content", "content-int", "empty",
        "too-long", "thread-int", "typing-str", "bad-status", "negative-seq", "sync-empty",
    ],
)  # fmt: skip
async def test_bad_frames_get_errors_and_hurt_no_one(
    stack: Stack, http: aiohttp.ClientSession, raw: str, message: str, code: str
) -> None:
    cid = channel("bad")
    bad, _ = await join(http, stack, cid, "mallory")
    good, _ = await join(http, stack, cid, "gina")
    await bad.ws.send_str(raw)
    err = await bad.recv_type("error")
    assert err["message"] == message and err["code"] == code
    # The connection stays open and the channel works for everyone.
    await bad.send({"type": "message", "content": "ok now"})
    assert (await good.recv_message())["content"] == "ok now"
    assert (await bad.recv_message())["content"] == "ok now"
    assert [m.content for m in await store_messages(stack, cid)] == ["ok now"]
    await bad.close()
    await good.close()


async def test_binary_frame_is_refused_with_error(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    client, _ = await join(http, stack, channel("bin"), "bin")
    await client.ws.send_bytes(b"\x00\x01")
    err = await client.recv_type("error")
    assert err["code"] == "binary_unsupported"
    await client.send({"type": "ping"})
    assert (await client.recv())["type"] == "pong"
    await client.close()


async def test_oversized_frame_closes_1009(stack: Stack, http: aiohttp.ClientSession) -> None:
    client, _ = await join(http, stack, channel("big"), "big")
    await client.ws.send_str('{"type":"message","content":"' + "y" * 70_000 + '"}')
    assert await client.wait_closed() == 1009


async def test_ping_pong(stack: Stack, http: aiohttp.ClientSession) -> None:
    client, _ = await join(http, stack, channel("ping"), "pinger")
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}
    await client.close()


async def test_typing_goes_to_everyone_but_the_typist(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid = channel("typing")
    typist, _ = await join(http, stack, cid, "tina")
    other, _ = await join(http, stack, cid, "oscar")
    await typist.recv_type("user_connected")
    await typist.send({"type": "typing", "isTyping": True})
    frame = await other.recv_type("typing")
    assert frame == {
        "type": "typing",
        "channelId": cid,
        "userId": "tina",
        "username": "tina",
        "isTyping": True,
    }
    # The owner handles a channel's events in order: the typist's next frame
    # from the owner is its own message, with no typing echo before it.
    await typist.send({"type": "message", "content": "done typing"})
    nxt = await typist.recv()
    assert nxt["type"] == "message", nxt
    await typist.send({"type": "typing", "isTyping": False})
    assert (await other.recv_type("typing"))["isTyping"] is False
    assert await store_messages(stack, cid) and all(
        m.content == "done typing" for m in await store_messages(stack, cid)
    )
    await typist.close()
    await other.close()


async def test_presence_and_connect_disconnect_per_user(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid = channel("presence")
    watcher, _ = await join(http, stack, cid, "walt")
    pat1, _ = await join(http, stack, cid, "pat")
    assert await watcher.recv() == {
        "type": "user_connected",
        "channelId": cid,
        "userId": "pat",
        "username": "pat",
    }
    pat2, state = await join(http, stack, cid, "pat")  # same user, second tab: no event
    assert sorted(u["userId"] for u in state["onlineUsers"]) == ["pat", "walt"]
    await pat1.send({"type": "presence", "status": "away"})
    assert await watcher.recv() == {
        "type": "presence",
        "channelId": cid,
        "userId": "pat",
        "username": "pat",
        "status": "away",
    }
    newcomer, state = await join(http, stack, cid, "nina")
    statuses = {u["userId"]: u["status"] for u in state["onlineUsers"]}
    assert statuses == {"walt": "online", "pat": "away", "nina": "online"}
    assert (await watcher.recv())["type"] == "user_connected"
    await pat1.close()  # pat still has a connection: no user_disconnected
    await pat2.send({"type": "message", "content": "still online"})
    assert (await watcher.recv())["type"] == "message"
    await pat2.close()
    # (Between the message and the departure: pat's read receipt, as sending reads.)
    # The shared stack runs without a presence linger; test_reads_presence has it.
    assert await watcher.recv_type("user_disconnected") == {
        "type": "user_disconnected",
        "channelId": cid,
        "userId": "pat",
        "username": "pat",
    }
    await watcher.close()
    await newcomer.close()


async def test_sync_replays_missed_messages_in_order(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid = channel("sync")
    poster, _ = await join(http, stack, cid, "poster")
    for i in range(1, 8):
        await poster.send({"type": "message", "content": f"n{i}"})
    for _ in range(7):
        await poster.recv_type("ack")
    late, state = await join(http, stack, cid, "late")
    assert state["lastSeq"] == 7
    await late.send({"type": "sync", "afterSeq": 3})
    replayed = [await late.recv_message() for _ in range(4)]
    assert [m["seq"] for m in replayed] == [4, 5, 6, 7]
    assert [m["content"] for m in replayed] == ["n4", "n5", "n6", "n7"]
    assert await late.recv() == {
        "type": "sync_complete",
        "channelId": cid,
        "lastSeq": 7,
        "count": 4,
    }
    # By message id: after seq 5's id.
    again, _ = await join(http, stack, cid, "again")
    await again.send({"type": "sync", "afterMessageId": replayed[1]["id"]})
    assert [(await again.recv_message())["seq"] for _ in range(2)] == [6, 7]
    assert await again.recv() == {
        "type": "sync_complete",
        "channelId": cid,
        "lastSeq": 7,
        "count": 2,
    }
    await again.send({"type": "sync", "afterMessageId": "no-such-id"})
    err = await again.recv_type("error")
    assert err["code"] == "unknown_message_id"
    for c in (poster, late, again):
        await c.close()


async def test_back_to_back_syncs_both_complete(stack: Stack, http: aiohttp.ClientSession) -> None:
    cid = channel("twosync")
    poster, _ = await join(http, stack, cid, "poster")
    for i in range(5):
        await poster.send({"type": "message", "content": f"s{i}"})
    for _ in range(5):
        await poster.recv_type("ack")
    late, _ = await join(http, stack, cid, "late")
    await late.send({"type": "sync", "afterSeq": 0})
    await late.send({"type": "sync", "afterSeq": 0})
    done = [await late.recv_type("sync_complete"), await late.recv_type("sync_complete")]
    assert done[0] == {"type": "sync_complete", "channelId": cid, "lastSeq": 5, "count": 5}
    assert done[1] == {"type": "sync_complete", "channelId": cid, "lastSeq": 5, "count": 0}, (
        "nothing is sent twice"
    )
    assert late.seqs() == [1, 2, 3, 4, 5]
    await late.send({"type": "sync", "afterSeq": 0})
    await late.send({"type": "sync", "afterSeq": 0})
    await late.send({"type": "sync", "afterSeq": 0})
    codes: list[str] = []
    async with asyncio.timeout(10):
        while codes.count("sync_complete") < 2:
            frame = await late.recv()
            codes.append(frame.get("code") or frame["type"])
    assert "sync_in_progress" in codes or codes.count("sync_complete") == 3
    await poster.close()
    await late.close()


async def test_live_messages_during_sync_are_held_back_and_deduplicated(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid = channel("race")
    poster, _ = await join(http, stack, cid, "poster")
    for i in range(200):
        await poster.send({"type": "message", "content": f"old{i}"})
    for _ in range(200):
        await poster.recv_type("ack")
    syncer, state = await join(http, stack, cid, "syncer")
    assert state["lastSeq"] == 200
    await syncer.send({"type": "sync", "afterSeq": 0})
    for i in range(50):  # published while the replay runs
        await poster.send({"type": "message", "content": f"new{i}"})
    seqs: list[int] = []
    complete = None
    async with asyncio.timeout(20):
        while len(seqs) < 250 or complete is None:
            frame = await syncer.recv()
            if frame["type"] == "message":
                seqs.append(frame["message"]["seq"])
            elif frame["type"] == "sync_complete":
                complete = frame
    assert seqs == list(range(1, 251)), "every seq exactly once, in order"
    assert complete is not None and complete["count"] >= 200
    await poster.close()
    await syncer.close()


async def test_client_msg_id_makes_publish_idempotent(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid = channel("idem")
    sender, _ = await join(http, stack, cid, "sam")
    reader, _ = await join(http, stack, cid, "rita")
    await sender.send({"type": "message", "content": "once", "clientMsgId": "dup-1"})
    first = await sender.recv_type("ack")
    await sender.send({"type": "message", "content": "once", "clientMsgId": "dup-1"})
    second = await sender.recv_type("ack")
    assert first == second
    await sender.send({"type": "message", "content": "next"})
    got = [await reader.recv_message(), await reader.recv_message()]
    assert [m["content"] for m in got] == ["once", "next"]
    assert [m.content for m in await store_messages(stack, cid)] == ["once", "next"]
    await sender.close()
    await reader.close()


async def test_channels_are_isolated(stack: Stack, http: aiohttp.ClientSession) -> None:
    one, two = channel("one"), channel("two")
    a, _ = await join(http, stack, one, "a")
    b, _ = await join(http, stack, two, "b")
    await a.send({"type": "message", "content": "for one"})
    await b.send({"type": "message", "content": "for two"})
    assert (await a.recv_message())["content"] == "for one"
    m = await b.recv_message()
    assert m["content"] == "for two" and m["seq"] == 1
    await a.close()
    await b.close()


async def test_metrics_health_and_dev_token(stack: Stack, http: aiohttp.ClientSession) -> None:
    async with http.post(stack.http_url("/dev/token"), json={"username": "Zoe"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    client = await WsClient.connect(http, stack.ws_url(channel("m")), token=body["token"])
    state = await client.recv()
    assert state["onlineUsers"][0]["username"] == "Zoe"
    assert state["onlineUsers"][0]["userId"] == body["userId"]
    await client.send({"type": "message", "content": "measured"})
    await client.recv_type("ack")
    async with http.get(stack.http_url("/metrics")) as resp:
        text = await resp.text()
    for name in (
        "waddle_edge_connections",
        'waddle_edge_frames_in_total{type="message"}',
        'waddle_edge_frames_out_total{type="message"}',
        "waddle_edge_fanout_latency_seconds_bucket",
        "waddle_edge_connects_total",
    ):
        assert name in text, name
    count = [
        ln for ln in text.splitlines() if ln.startswith("waddle_edge_fanout_latency_seconds_count")
    ]
    assert count and float(count[0].split()[-1]) >= 1
    for path, expect in (("/healthz", 200), ("/readyz", 200)):
        async with http.get(stack.http_url(path)) as resp:
            assert resp.status == expect
    async with http.get(stack.http_url("/")) as resp:
        assert resp.status == 200
        assert "Content-Security-Policy" in resp.headers
    await client.close()
    with pytest.raises(Closed):
        await client.recv(timeout=1)
