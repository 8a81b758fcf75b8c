"""``WaddleClient`` against the protocol-speaking test peer: reconnects and
backoff, the send queue and resends, sync and the exactly-once filter,
errors, presence/typing, online users and the event APIs."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

from tests.waddle_client.conftest import ClientFactory
from tests.waddle_client.helpers import Recorder
from tests.waddle_client.peer import Peer
from waddle_client import (
    Ack,
    ClientClosedError,
    ConnectionState,
    ErrorEvent,
    Event,
    InitialState,
    Message,
    Presence,
    QueueFullError,
    SendError,
    State,
    SyncComplete,
    Typing,
    UserConnected,
    UserDisconnected,
    WaddleClient,
    channel_socket_url,
)

pytestmark = pytest.mark.timeout(30)


# -- URLs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://h:1", "ws://h:1/channel/c%2Fx/websocket"),
        ("https://h/prefix/", "wss://h/prefix/channel/c%2Fx/websocket"),
        ("ws://h:2", "ws://h:2/channel/c%2Fx/websocket"),
        ("wss://h", "wss://h/channel/c%2Fx/websocket"),
    ],
)
def test_channel_socket_url(base: str, expected: str) -> None:
    assert channel_socket_url(base, "c/x") == expected


def test_bad_url_refused_early() -> None:
    with pytest.raises(ValueError):
        WaddleClient("ftp://h", "c", "t")
    with pytest.raises(ValueError):
        WaddleClient("http://h", "c")  # neither token nor provider


# -- backoff and reconnects ------------------------------------------------------------


async def test_backoff_is_full_jitter_with_cap_and_resets_after_stable(
    peer: Peer, make_client: ClientFactory
) -> None:
    draws = iter([0.5, 0.25, 0.5, 0.9, 0.75, 0.5, 0.5, 0.5])
    now = [0.0]
    client = make_client(
        backoff_base=0.01,
        backoff_cap=0.04,
        stable_after=10.0,
        random=lambda: next(draws),
        clock=lambda: now[0],
    )
    rec = Recorder(client)
    peer.refuse.extend([503] * 5)
    await client.connect()
    await rec.wait_state(State.OPEN)
    retries = [s for s in rec.states() if s.state is State.RECONNECTING]
    assert [s.attempt for s in retries] == [0, 1, 2, 3, 4]
    # delay = random * min(cap, base * 2**attempt): 0.01, 0.02, 0.04, then capped at 0.04.
    assert [s.delay for s in retries] == pytest.approx(
        [0.5 * 0.01, 0.25 * 0.02, 0.5 * 0.04, 0.9 * 0.04, 0.75 * 0.04]
    )
    assert all(s.http_status == 503 for s in retries)

    # Open for >= stable_after (10 s on the injected clock): the counter resets.
    conn = await peer.next_connection()
    assert len(peer.handshakes) == 6  # five refused, then this one
    now[0] += 10.0
    mark = len(rec.events)
    await conn.close(1012, "restart")
    state = await rec.wait_for(ConnectionState, lambda s: s.state is State.RECONNECTING, start=mark)
    assert (state.attempt, state.close_code) == (0, 1012)
    assert state.delay == pytest.approx(0.5 * 0.01)

    # Open for less than stable_after: the counter keeps counting.
    conn = await peer.next_connection()
    now[0] += 9.9
    mark = len(rec.events)
    await conn.close(1012, "restart")
    state = await rec.wait_for(ConnectionState, lambda s: s.state is State.RECONNECTING, start=mark)
    assert state.attempt == 1
    assert state.delay == pytest.approx(0.5 * 0.02)
    await peer.next_connection()


@pytest.mark.parametrize("how", ["1001", "1011", "1012", "1013", "4001", "drop"])
async def test_reconnects_after_abnormal_close_and_restart_codes(
    peer: Peer, make_client: ClientFactory, how: str
) -> None:
    peer.add_message("one")
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    if how == "drop":
        conn.drop()
    else:
        await conn.close(int(how), "bye")
    second = await peer.next_connection()
    retry = await rec.wait_for(ConnectionState, lambda s: s.state is State.RECONNECTING)
    assert retry.close_code == (1006 if how == "drop" else int(how))
    sync = await second.recv("sync")
    assert sync == {"type": "sync", "afterSeq": 1}
    await rec.wait_state(State.OPEN, start=rec.events.index(retry))
    assert client.state is State.OPEN


async def test_no_reconnect_after_close(peer: Peer, make_client: ClientFactory) -> None:
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    await client.close()
    await asyncio.wait_for(conn.closed.wait(), 5)
    assert conn.close_code == 1000
    reason = await client.wait_closed()  # the connection loop has ended
    assert reason.close_code is None and reason.http_status is None
    assert client.state is State.CLOSED
    final = rec.states()[-1]
    assert final.state is State.CLOSED and final.reason == "closed by the application"
    assert len(peer.handshakes) == 1
    with pytest.raises(ClientClosedError):
        client.send_nowait("too late")
    with pytest.raises(ClientClosedError):
        await client.connect()


async def test_no_reconnect_after_1008_and_pending_sends_fail(
    peer: Peer, make_client: ClientFactory
) -> None:
    peer.auto_publish = False
    client = make_client()
    await client.connect()
    conn = await peer.next_connection()
    sending = asyncio.create_task(client.send("unacked"))
    await conn.recv("message")
    await conn.close(1008, "abuse")
    reason = await client.wait_closed()
    assert reason.close_code == 1008 and reason.reason == "abuse"
    with pytest.raises(ClientClosedError) as info:
        await sending
    assert info.value.close_code == 1008
    assert len(peer.handshakes) == 1 and client.state is State.CLOSED


async def test_server_normal_close_is_terminal(peer: Peer, make_client: ClientFactory) -> None:
    client = make_client()
    await client.connect()
    conn = await peer.next_connection()
    await conn.close(1000, "done")
    reason = await client.wait_closed()
    assert reason.close_code == 1000
    assert len(peer.handshakes) == 1


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_no_reconnect_after_auth_refusal(
    peer: Peer, make_client: ClientFactory, status: int
) -> None:
    client = make_client()
    rec = Recorder(client)
    peer.refuse.append(status)
    with pytest.raises(ClientClosedError) as info:
        await client.connect()
    assert info.value.http_status == status
    await client.wait_closed()
    assert len(peer.handshakes) == 1
    await rec.wait_state(State.CLOSED)
    final = rec.states()[-1]
    assert final.state is State.CLOSED and final.http_status == status


async def test_auth_refusal_on_reconnect_is_terminal(
    peer: Peer, make_client: ClientFactory
) -> None:
    client = make_client()
    await client.connect()
    conn = await peer.next_connection()
    peer.refuse.append(401)
    await conn.close(1012)
    reason = await client.wait_closed()
    assert reason.http_status == 401
    assert len(peer.handshakes) == 2


# -- the send queue -----------------------------------------------------------------------


async def test_sends_queue_before_connect_bounded(peer: Peer, make_client: ClientFactory) -> None:
    client = make_client(max_queue=3)
    rec = Recorder(client)
    ids = [client.send_nowait(f"q{i}") for i in range(3)]
    with pytest.raises(QueueFullError) as info:
        client.send_nowait("one too many")
    assert info.value.limit == 3
    assert client.pending == tuple(ids)
    await client.connect()
    conn = await peer.next_connection()
    got = [await conn.recv("message") for _ in range(3)]
    assert [f["clientMsgId"] for f in got] == ids
    assert [f["content"] for f in got] == ["q0", "q1", "q2"]
    await client.flush()
    assert client.pending == ()
    assert [a.client_msg_id for a in await rec.wait_count(Ack, 3)] == ids
    client.send_nowait("room again")  # acks freed the queue


async def test_sends_queue_while_reconnecting(peer: Peer, make_client: ClientFactory) -> None:
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    peer.refuse_always = 503
    conn.drop()
    await rec.wait_state(State.RECONNECTING)
    assert client.state is State.RECONNECTING
    sends = [asyncio.create_task(client.send(f"offline {i}")) for i in range(3)]
    assert await client.set_typing(True) is False  # typing is not queued
    peer.refuse_always = None
    conn = await peer.next_connection()
    acks = await asyncio.gather(*sends)
    frames = [f for f in conn.received if f["type"] == "message"]
    assert [f["content"] for f in frames] == ["offline 0", "offline 1", "offline 2"]
    assert [a.client_msg_id for a in acks] == [f["clientMsgId"] for f in frames]
    assert [a.seq for a in acks] == [1, 2, 3]
    assert not any(f["type"] == "typing" for f in conn.received)


async def test_unacked_messages_resent_with_same_client_msg_id(
    peer: Peer, make_client: ClientFactory
) -> None:
    peer.auto_publish = False
    client = make_client()
    await client.connect()
    conn = await peer.next_connection()
    first = asyncio.create_task(client.send("acked before the drop"))
    second = asyncio.create_task(client.send("lost with the connection", thread_id="t1"))
    f1 = await conn.recv("message")
    f2 = await conn.recv("message")
    await conn.send({"type": "ack", "clientMsgId": f1["clientMsgId"], "id": "a", "seq": 1,
                     "timestamp": 5})  # fmt: skip
    assert (await first).seq == 1
    conn.drop()
    conn2 = await peer.next_connection()
    resent = await conn2.recv("message")
    assert resent == f2  # same clientMsgId, content and threadId
    assert resent["threadId"] == "t1"
    await conn2.send({"type": "ack", "clientMsgId": f2["clientMsgId"], "id": "b", "seq": 2,
                      "timestamp": 6})  # fmt: skip
    ack = await second
    assert (ack.client_msg_id, ack.id, ack.seq, ack.timestamp) == (f2["clientMsgId"], "b", 2, 6)
    # Only the unacknowledged one was resent, after the sync.
    types = [f["type"] for f in conn2.received]
    assert types == ["sync", "message"]


async def test_duplicate_ack_is_harmless(peer: Peer, make_client: ClientFactory) -> None:
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    ack = await client.send("once")
    await conn.send({"type": "ack", "clientMsgId": ack.client_msg_id, "id": ack.id,
                     "seq": ack.seq, "timestamp": ack.timestamp})  # fmt: skip
    await conn.send({"type": "ping-marker"})  # unknown frames are ignored
    await client.send("twice")
    await rec.wait_for(Ack, lambda a: a.seq == 2)
    assert [a.seq for a in rec.of(Ack)] == [1, 2]


# -- errors ------------------------------------------------------------------------------


async def test_retryable_error_resends_after_backoff(
    peer: Peer, make_client: ClientFactory
) -> None:
    peer.auto_publish = False
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    sending = asyncio.create_task(client.send("try again"))
    frame = await conn.recv("message")
    for _ in range(2):
        await conn.send({"type": "error", "message": "Channel temporarily unavailable",
                         "code": "unavailable", "retryable": True,
                         "clientMsgId": frame["clientMsgId"]})  # fmt: skip
        assert await conn.recv("message") == frame  # same id, same content
    assert not sending.done()
    await conn.send({"type": "ack", "clientMsgId": frame["clientMsgId"], "id": "x", "seq": 1,
                     "timestamp": 1})  # fmt: skip
    assert (await sending).id == "x"
    errors = rec.of(ErrorEvent)
    assert [(e.code, e.retryable, e.client_msg_id) for e in errors] == [
        ("unavailable", True, frame["clientMsgId"])
    ] * 2


async def test_non_retryable_error_fails_that_send(peer: Peer, make_client: ClientFactory) -> None:
    peer.auto_publish = False
    client = make_client()
    await client.connect()
    conn = await peer.next_connection()
    doomed = asyncio.create_task(client.send("let me in"))
    fine = asyncio.create_task(client.send("other"))
    frame = await conn.recv("message")
    other = await conn.recv("message")
    await conn.send({"type": "error", "message": "No write permission",
                     "code": "no_write_permission", "clientMsgId": frame["clientMsgId"]})  # fmt: skip
    with pytest.raises(SendError) as info:
        await doomed
    assert info.value.code == "no_write_permission"
    assert info.value.message == "No write permission"
    assert info.value.client_msg_id == frame["clientMsgId"]
    assert client.pending == (other["clientMsgId"],)
    assert not fine.done()
    await client.close()
    with pytest.raises(ClientClosedError):
        await fine


async def test_rate_limited_message_is_resent_and_writes_are_paced(
    peer: Peer, make_client: ClientFactory
) -> None:
    peer.auto_publish = False
    client = make_client(backoff_cap=1.0)  # the pacing interval is capped by backoff_cap
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    loop = asyncio.get_running_loop()
    first = client.send_nowait("one")
    frame = await conn.recv("message")
    assert frame["clientMsgId"] == first
    refused_at = loop.time()
    await conn.send({"type": "error", "message": "Rate limited", "code": "rate_limited",
                     "retryable": True, "retryAfterMs": 100, "clientMsgId": first})  # fmt: skip
    await rec.wait_for(ErrorEvent)  # the client has seen the refusal
    second = client.send_nowait("two")
    third = client.send_nowait("three")
    again = await conn.recv("message")
    resent_at = loop.time()
    assert again == frame
    assert resent_at - refused_at >= 0.1  # not before the server's retryAfterMs

    async def ack(f: dict[str, object], seq: int) -> None:
        await conn.send({"type": "ack", "clientMsgId": f["clientMsgId"], "id": f"i{seq}",
                         "seq": seq, "timestamp": seq})  # fmt: skip

    # Once rate limited, one message at a time: "two" waits for the ack of
    # "one", held here for longer than the pacing interval.
    await asyncio.sleep(0.25)
    acked_at = loop.time()
    await ack(again, 1)
    two = await conn.recv("message")
    second_at = loop.time()
    assert two["clientMsgId"] == second and second_at >= acked_at
    await ack(two, 2)
    three = await conn.recv("message")
    third_at = loop.time()
    assert three["clientMsgId"] == third
    # Writes are spaced by the learnt interval (100 ms and a margin).
    assert third_at - second_at >= 0.1
    await ack(three, 3)
    await client.flush()


async def test_in_flight_window_bounds_unacked_writes(
    peer: Peer, make_client: ClientFactory
) -> None:
    peer.auto_publish = False
    client = make_client(max_in_flight=2)
    await client.connect()
    conn = await peer.next_connection()
    ids = [client.send_nowait(f"w{i}") for i in range(4)]
    assert [(await conn.recv())["clientMsgId"] for _ in range(2)] == ids[:2]
    await client.set_typing(True)  # written directly: it overtakes the held messages
    assert (await conn.recv())["type"] == "typing"
    await conn.send({"type": "ack", "clientMsgId": ids[0], "id": "a", "seq": 1, "timestamp": 1})
    assert (await conn.recv())["clientMsgId"] == ids[2]
    await client.set_typing(False)
    assert (await conn.recv())["type"] == "typing"


async def test_overdue_ack_resends_same_message(peer: Peer, make_client: ClientFactory) -> None:
    peer.auto_publish = False
    client = make_client(ack_timeout=0.05)
    await client.connect()
    conn = await peer.next_connection()
    sending = asyncio.create_task(client.send("anyone there?"))
    frame = await conn.recv("message")
    assert await conn.recv("message") == frame  # no answer: written again, same id
    await conn.send({"type": "ack", "clientMsgId": frame["clientMsgId"], "id": "i", "seq": 1,
                     "timestamp": 1})  # fmt: skip
    assert (await sending).client_msg_id == frame["clientMsgId"]


async def test_frame_too_big_refused_locally(peer: Peer, make_client: ClientFactory) -> None:
    client = make_client(max_frame_bytes=1024)
    await client.connect()
    with pytest.raises(SendError) as info:
        await client.send("x" * 2000)
    assert info.value.code == "frame_too_big"
    assert client.pending == ()


# -- sync and the exactly-once filter ---------------------------------------------------------


async def test_sync_after_reconnect_asks_from_last_delivered_seq(
    peer: Peer, make_client: ClientFactory
) -> None:
    for i in range(3):
        peer.add_message(f"m{i + 1}")
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    assert not any(f["type"] == "sync" for f in conn.received)  # nothing missing at first
    await peer.publish("m4")
    assert await rec.wait_seqs(4) == [1, 2, 3, 4]
    conn.drop()
    peer.add_message("m5")  # published while the client was away
    peer.add_message("m6")
    peer.history_window = 0  # the reconnect's initial_state carries no history
    conn2 = await peer.next_connection()
    assert await conn2.recv() == {"type": "sync", "afterSeq": 4}
    await rec.wait_for(SyncComplete)
    assert rec.seqs() == [1, 2, 3, 4, 5, 6]
    assert client.last_seq == 6


async def test_duplicates_and_old_seqs_dropped(peer: Peer, make_client: ClientFactory) -> None:
    bodies = [peer.add_message(f"m{i}") for i in range(1, 4)]
    peer.history_window = 2  # initial_state shows 2 and 3
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    for body in (bodies[1], bodies[2], bodies[0], bodies[2]):  # all old
        await conn.send_message(body)
    new = peer.add_message("m4")
    await conn.send_message(new)
    await conn.send_message(new)
    await peer.publish("m5")
    await rec.wait_seqs(3)
    # Reconnect: initial_state repeats 2..5 and the sync replays 3..5.
    peer.history_window = 4
    conn.drop()
    conn2 = await peer.next_connection()
    sync = await conn2.recv("sync")
    assert sync["afterSeq"] == 5
    await conn2.send_message(bodies[2])
    await conn2.send({"type": "sync_complete", "lastSeq": 5, "count": 0})
    await rec.wait_for(SyncComplete)
    await peer.publish("m6")
    seqs = await rec.wait_seqs(5)
    assert seqs == [2, 3, 4, 5, 6]
    assert [m.content for m in rec.of(Message)] == ["m2", "m3", "m4", "m5", "m6"]


async def test_gap_is_held_and_sync_requested(peer: Peer, make_client: ClientFactory) -> None:
    peer.auto_sync = False
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    m1 = peer.add_message("m1")
    m2 = peer.add_message("m2")
    m3 = peer.add_message("m3")
    m4 = peer.add_message("m4")
    await conn.send_message(m1)
    await conn.send_message(m4)  # 2 and 3 missing
    assert await conn.recv("sync") == {"type": "sync", "afterSeq": 1}
    assert client.last_seq == 1  # 4 is held back
    await conn.send_message(m3)  # still a gap: held as well, no second sync yet
    await conn.send_message(m2)
    await conn.send_message(m3)
    await conn.send({"type": "sync_complete", "lastSeq": 4, "count": 2})
    await rec.wait_for(SyncComplete)
    assert rec.seqs() == [1, 2, 3, 4]
    assert [f["type"] for f in conn.received] == ["sync"]


async def test_sync_refused_while_server_syncs_is_asked_again(
    peer: Peer, make_client: ClientFactory
) -> None:
    peer.add_message("m1")
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    peer.auto_sync = False
    conn.drop()
    conn2 = await peer.next_connection()
    assert await conn2.recv("sync") == {"type": "sync", "afterSeq": 1}
    await conn2.send({"type": "error", "message": "Sync already in progress",
                      "code": "sync_in_progress"})  # fmt: skip
    assert await conn2.recv("sync") == {"type": "sync", "afterSeq": 1}
    await conn2.send({"type": "sync_complete", "lastSeq": 1, "count": 0})
    await rec.wait_for(SyncComplete)


async def test_unfillable_gap_is_skipped_after_repeated_syncs(
    peer: Peer, make_client: ClientFactory
) -> None:
    peer.auto_sync = False
    client = make_client(max_gap_syncs=2)
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    await conn.send_message(peer.add_message("m1"))
    peer.add_message("lost")
    await conn.send_message(peer.add_message("m3"))
    for _ in range(2):
        await conn.recv("sync")
        await conn.send({"type": "sync_complete", "lastSeq": 3, "count": 0})
    skipped = await rec.wait_for(ErrorEvent, lambda e: e.code == "gap_skipped")
    assert "2 to 2" in skipped.message
    assert rec.seqs() == [1, 3]


async def test_first_connection_starts_at_the_history_window(
    peer: Peer, make_client: ClientFactory
) -> None:
    for i in range(60):
        peer.add_message(f"m{i + 1}")
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    assert await rec.wait_seqs(50) == list(range(11, 61))
    state = rec.of(InitialState)[0]
    assert state.last_seq == 60 and len(state.messages) == 50 and not state.reconnect
    await peer.publish("m61")
    assert (await rec.wait_seqs(51))[-1] == 61
    assert conn.received == []  # nothing was missing: no sync


async def test_history_reset_starts_over(peer: Peer, make_client: ClientFactory) -> None:
    for i in range(5):
        peer.add_message(f"m{i + 1}")
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    conn = await peer.next_connection()
    await rec.wait_seqs(5)
    peer.messages.clear()  # a wiped server
    peer.add_message("fresh")
    conn.drop()
    await peer.next_connection()
    await rec.wait_for(ErrorEvent, lambda e: e.code == "history_reset")
    await rec.wait_seqs(6)
    assert rec.seqs() == [1, 2, 3, 4, 5, 1]


# -- presence, typing, online users -----------------------------------------------------------


async def test_online_users_follow_the_server(peer: Peer, make_client: ClientFactory) -> None:
    peer.online_users = [
        {"userId": "alice", "username": "Alice", "joinedAt": 1, "status": "online"},
        {"userId": "bob", "username": "Bob", "joinedAt": 2, "status": "online"},
    ]
    client = make_client()
    rec = Recorder(client)
    await client.connect()
    assert set(client.online_users) == {"alice", "bob"}
    conn = await peer.next_connection()
    await conn.send({"type": "user_connected", "userId": "carol", "username": "Carol"})
    await conn.send({"type": "presence", "userId": "bob", "username": "Bob", "status": "away"})
    await conn.send({"type": "user_disconnected", "userId": "alice", "username": "Alice"})
    await conn.send({"type": "typing", "userId": "bob", "username": "Bob", "isTyping": True})
    await rec.wait_for(Typing)
    users = client.online_users
    assert set(users) == {"bob", "carol"}
    assert users["bob"].status == "away" and users["bob"].joined_at == 2
    assert users["carol"].username == "Carol" and users["carol"].status == "online"
    assert rec.of(UserConnected) == [UserConnected("carol", "Carol")]
    assert rec.of(Presence) == [Presence("bob", "Bob", "away")]
    assert rec.of(UserDisconnected) == [UserDisconnected("alice", "Alice")]
    assert rec.of(Typing) == [Typing("bob", "Bob", True)]
    with pytest.raises(TypeError):
        users["x"] = users["bob"]  # type: ignore[index]
    # A reconnect replaces the list with the server's.
    peer.online_users = [{"userId": "dave", "username": "Dave", "status": "dnd"}]
    conn.drop()
    await peer.next_connection()
    await rec.wait_for(InitialState, lambda s: s.reconnect)
    assert {u: v.status for u, v in client.online_users.items()} == {"dave": "dnd"}


async def test_presence_remembered_and_typing_sent_live(
    peer: Peer, make_client: ClientFactory
) -> None:
    client = make_client()
    await client.connect()
    conn = await peer.next_connection()
    assert await client.set_typing(True) is True
    assert await conn.recv("typing") == {"type": "typing", "isTyping": True}
    assert await client.set_presence("away") is True
    assert await conn.recv("presence") == {"type": "presence", "status": "away"}
    with pytest.raises(ValueError):
        await client.set_presence("asleep")
    conn.drop()
    conn2 = await peer.next_connection()
    assert await conn2.recv() == {"type": "sync", "afterSeq": 0}
    assert await conn2.recv() == {"type": "presence", "status": "away"}


# -- tokens and URLs ------------------------------------------------------------------------------


async def test_token_provider_called_before_each_reconnect(
    peer: Peer, make_client: ClientFactory
) -> None:
    counter = itertools.count(1)

    async def fresh_token() -> str:
        return f"fresh-{next(counter)}"

    client = make_client(token="first", token_provider=fresh_token)
    await client.connect()
    conn = await peer.next_connection()
    peer.refuse.append(503)
    await conn.close(4001, "token expired")  # the server's "get a fresh token" close
    await peer.next_connection()
    assert peer.handshakes == ["Bearer first", "Bearer fresh-1", "Bearer fresh-2"]


async def test_token_provider_failure_is_retried(peer: Peer, make_client: ClientFactory) -> None:
    calls = [0]

    def flaky() -> str:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("identity service down")
        return "ok"

    client = make_client(token=None, token_provider=flaky)
    rec = Recorder(client)
    await client.connect()
    error = await rec.wait_for(ErrorEvent, lambda e: e.code == "token_provider")
    assert "identity service down" in error.message
    assert peer.handshakes == ["Bearer ok"]


async def test_url_list_moves_to_the_next_edge(make_client: ClientFactory, peer: Peer) -> None:
    other = Peer(peer.channel_id)
    await other.start()
    try:
        peer.add_message("shared history")
        other.messages = peer.messages
        client = make_client(url=[peer.url, other.url])
        rec = Recorder(client)
        await client.connect()
        conn = await peer.next_connection()
        await peer.stop()  # the first edge dies
        conn2 = await other.next_connection()
        assert await conn2.recv("sync") == {"type": "sync", "afterSeq": 1}
        opened = await rec.wait_for(ConnectionState, lambda s: s.url is not None and
                                    s.url.startswith(f"ws://127.0.0.1:{other.port}/"))  # fmt: skip
        assert opened.state is State.OPEN
        assert conn.closed.is_set()
        ack = await client.send("via the second edge")
        assert ack.seq == 2
    finally:
        await other.stop()


async def test_url_provider(peer: Peer, make_client: ClientFactory) -> None:
    asked: list[int] = []

    async def where() -> str:
        asked.append(1)
        return peer.url

    client = make_client(url_provider=where)
    await client.connect()
    assert asked == [1]


# -- event APIs ---------------------------------------------------------------------------------------


async def test_async_with_and_event_iterator_miss_nothing(peer: Peer) -> None:
    peer.add_message("hello")
    seen: list[Event] = []
    async with WaddleClient(peer.url, peer.channel_id, "tok", heartbeat=None) as client:
        stream = client.events()
        ack = await client.send("mine")
        async for event in stream:
            seen.append(event)
            if isinstance(event, Ack):
                break
        await stream.aclose()
        closing = client.events()
    kinds = [type(e).__name__ for e in seen]
    assert kinds[:4] == ["ConnectionState", "InitialState", "Message", "ConnectionState"]
    assert [m.seq for m in seen if isinstance(m, Message)] == [1, 2]
    assert seen[-1] == ack
    # An iterator made before close() sees the terminal state, one made after sees nothing.
    assert [e async for e in closing] == [
        ConnectionState(State.CLOSED, reason="closed by the application")
    ]
    assert [e async for e in client.events()] == []


async def test_iterator_ends_with_the_terminal_state(
    peer: Peer, make_client: ClientFactory
) -> None:
    client = make_client()
    await client.connect()
    stream = client.events()
    conn = await peer.next_connection()
    await conn.close(1008, "go away")
    events = [e async for e in stream]
    assert isinstance(events[-1], ConnectionState)
    assert events[-1].state is State.CLOSED and events[-1].close_code == 1008


async def test_callbacks_by_type_sync_and_async_and_unsubscribe(
    peer: Peer, make_client: ClientFactory
) -> None:
    client = make_client()
    got_sync: list[Message] = []
    got_async: list[Message] = []
    states: list[State] = []

    async def on_message_async(m: Message) -> None:
        await asyncio.sleep(0)
        got_async.append(m)

    off = client.on(Message, got_sync.append)
    client.on(Message, on_message_async)
    client.on(ConnectionState, lambda s: states.append(s.state))
    rec = Recorder(client)
    await client.connect()
    await client.send("one")
    await rec.wait_seqs(1)
    off()
    await client.send("two")
    await rec.wait_seqs(2)
    assert [m.seq for m in got_sync] == [1]
    assert [m.seq for m in got_async] == [1, 2]
    assert states == [State.CONNECTING, State.OPEN]


async def test_failing_callback_is_reported_and_others_still_run(
    peer: Peer, make_client: ClientFactory
) -> None:
    client = make_client()

    def boom(_: Message) -> None:
        raise RuntimeError("bad handler")

    client.on(Message, boom)
    rec = Recorder(client)
    await client.connect()
    await client.send("x")
    error = await rec.wait_for(ErrorEvent, lambda e: e.code == "callback")
    assert "bad handler" in error.message
    await rec.wait_seqs(1)


async def test_send_wire_format(peer: Peer, make_client: ClientFactory) -> None:
    client = make_client()
    await client.connect()
    conn = await peer.next_connection()
    cmid = client.send_nowait("héllo", thread_id="thr")
    frame = await conn.recv("message")
    assert frame == {"type": "message", "content": "héllo", "clientMsgId": cmid, "threadId": "thr"}
    assert len(cmid) == 36 and cmid.count("-") == 4
    assert json.loads(json.dumps(frame)) == frame
    assert peer.handshakes == ["Bearer tok"]


async def test_connection_without_initial_state_is_retried(
    peer: Peer, make_client: ClientFactory
) -> None:
    peer.auto_initial_state = False
    client = make_client(open_timeout=0.2)
    rec = Recorder(client)
    connecting = asyncio.create_task(client.connect())
    wrong = await peer.next_connection()
    await wrong.send({"type": "pong"})  # not initial_state: the client gives up on it
    await asyncio.wait_for(wrong.closed.wait(), 5)
    await peer.next_connection()  # says nothing: the client times out
    third = await peer.next_connection()
    await third.send(peer.initial_state())
    await connecting
    assert client.state is State.OPEN
    reasons = [s.reason for s in rec.states() if s.state is State.RECONNECTING]
    assert reasons == ["no initial_state", "timed out waiting for initial_state"]
    assert any(e.code == "bad_frame" for e in rec.of(ErrorEvent))
