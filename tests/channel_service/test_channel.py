"""The channel actor without I/O: membership, presence (and its linger),
typing, capacity, read cursors, publish validation and in-order broadcast of
committed messages."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import orjson

from channel_service.channel import Channel, ChannelPolicy, Conn, RecentWindow
from waddle_pb import channel_pb2, store_pb2


@dataclass
class Recorder:
    broadcasts: list[dict[str, Any]] = field(default_factory=list)
    replies: list[tuple[str, int, dict[str, Any], bool]] = field(default_factory=list)
    reply_types: list[str] = field(default_factory=list)
    results: list[tuple[str, channel_pb2.JoinResult]] = field(default_factory=list)
    lingering: list[str] = field(default_factory=list)
    moved: list[tuple[str, int]] = field(default_factory=list)

    def broadcast(self, channel: Channel, payload: bytes, **kw: Any) -> None:
        self.broadcasts.append({"frame": orjson.loads(payload), "edges": dict(channel.edges), **kw})

    def reply(self, edge_id: str, conn_id: int, channel_id: str, payload: bytes, **kw: Any) -> None:
        self.replies.append((edge_id, conn_id, orjson.loads(payload), kw.get("final", False)))
        self.reply_types.append(kw.get("frame_type", ""))

    def join_result(self, edge_id: str, result: channel_pb2.JoinResult) -> None:
        self.results.append((edge_id, result))

    def linger(self, channel: Channel, user_id: str) -> None:
        self.lingering.append(user_id)

    def cursor_moved(self, channel: Channel, user_id: str, seq: int) -> None:
        self.moved.append((user_id, seq))

    def types(self) -> list[str]:
        return [b["frame"]["type"] for b in self.broadcasts]


def make_channel(max_connections: int = 10, *, linger: float = 0.0) -> Channel:
    return Channel(
        channel_id="c1",
        last_seq=0,
        max_connections=max_connections,
        policy=ChannelPolicy(
            recent_limit=3, online_users_limit=3, presence_fanout_limit=4, presence_linger=linger
        ),
        recent=collections.deque(maxlen=3),
    )


def conn(edge: str, cid: int, user: str, *, write: bool = True, session: int = 1) -> Conn:
    return Conn(edge, cid, user, user.title(), "", write, 1000 + cid, "online", session)


def test_first_and_last_connection_of_a_user_announce_presence() -> None:
    ch, rec = make_channel(), Recorder()
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e2", 2, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e1", 3, "bob"), rejoin=False, emit=rec)
    assert rec.types() == ["user_connected", "user_connected"]
    assert [b["exclude_user_id"] for b in rec.broadcasts] == ["ann", "bob"]
    assert ch.edges == {"e1": 2, "e2": 1}
    ch.leave("e1", 1, rec)
    assert rec.types() == ["user_connected", "user_connected"], "ann still has a connection"
    ch.leave("e2", 2, rec)
    assert rec.broadcasts[-1]["frame"] == {
        "type": "user_disconnected",
        "channelId": "c1",
        "userId": "ann",
        "username": "Ann",
    }
    assert ch.edges == {"e1": 1}
    assert list(ch.users) == ["bob"]


def test_join_result_carries_initial_state() -> None:
    ch, rec = make_channel(), Recorder()
    ch.last_seq = 7
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    edge, result = rec.results[-1]
    assert edge == "e1" and result.ok and result.last_seq == 7
    state = orjson.loads(result.initial_state)
    assert state["type"] == "initial_state" and state["lastSeq"] == 7
    assert state["onlineUsers"] == [
        {"userId": "ann", "username": "Ann", "joinedAt": 1001, "status": "online"}
    ]


def test_capacity_refuses_new_joins_but_never_rejoins() -> None:
    ch, rec = make_channel(max_connections=1), Recorder()
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e1", 2, "bob"), rejoin=False, emit=rec)
    assert not rec.results[-1][1].ok and rec.results[-1][1].refusal == "channel_full"
    assert len(ch.conns) == 1
    ch.join(conn("e2", 5, "cat"), rejoin=True, emit=rec)
    assert rec.results[-1][1].ok and len(ch.conns) == 2


def test_rejoin_is_silent_and_drop_session_removes_only_stale() -> None:
    ch, rec = make_channel(), Recorder()
    ch.join(conn("e1", 1, "ann", session=1), rejoin=False, emit=rec)
    ch.join(conn("e1", 2, "bob", session=1), rejoin=False, emit=rec)
    before = len(rec.broadcasts)
    ch.join(conn("e1", 1, "ann", session=2), rejoin=True, emit=rec)  # re-registered
    assert len(rec.broadcasts) == before
    dropped = ch.drop_session("e1", keep_session=2, emit=rec)
    assert dropped == 1 and list(ch.users) == ["ann"]
    assert rec.broadcasts[-1]["frame"]["type"] == "user_disconnected"


def test_typing_excludes_typist_and_is_cleared_on_leave() -> None:
    ch, rec = make_channel(), Recorder()
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e1", 2, "bob"), rejoin=False, emit=rec)
    ch.set_typing("e1", 1, True, rec)
    assert rec.broadcasts[-1]["frame"]["isTyping"] is True
    assert rec.broadcasts[-1]["exclude_user_id"] == "ann"
    assert rec.broadcasts[-1]["ephemeral"] is True
    ch.leave("e1", 1, rec)
    assert rec.types()[-2:] == ["typing", "user_disconnected"]
    assert rec.broadcasts[-2]["frame"]["isTyping"] is False


def test_presence_broadcasts_changes_only() -> None:
    ch, rec = make_channel(), Recorder()
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    ch.set_presence("e1", 1, "away", rec)
    ch.set_presence("e1", 1, "away", rec)
    ch.set_presence("e1", 1, "sleeping", rec)
    assert rec.types() == ["user_connected", "presence"]
    assert ch.users["ann"].status == "away"


def test_publish_validation() -> None:
    ch, rec = make_channel(), Recorder()
    ch.join(conn("e1", 1, "ann", write=False), rejoin=False, emit=rec)
    ch.join(conn("e1", 2, "bob"), rejoin=False, emit=rec)

    def pub(cid: int, content: str) -> object:
        p = channel_pb2.Publish(conn_id=cid, channel_id="c1", content=content, client_msg_id="k")
        return ch.publish("e1", p, max_length=5, deadline=0.0, emit=rec)

    assert pub(1, "hi") is None and rec.replies[-1][2]["code"] == "no_write_permission"
    assert pub(2, "toolong") is None and rec.replies[-1][2]["code"] == "message_too_long"
    assert pub(2, "  ") is None and rec.replies[-1][2]["code"] == "empty_message"
    assert pub(9, "hi") is None and rec.replies[-1][2]["code"] == "not_joined"
    assert pub(2, "h\x00i") is None and rec.replies[-1][2]["code"] == "invalid_field"
    assert all(final for *_, final in rec.replies)
    assert pub(2, "hi") is not None and len(ch.pending) == 1


def test_publish_refuses_what_the_store_would_refuse_from_any_field() -> None:
    """A member registered with a NUL in its name (by an edge that let it
    through) is refused per message, never inside a group commit."""
    ch, rec = make_channel(), Recorder()
    for i, (name, avatar) in enumerate([("Ev\x00l", ""), ("Eve", "https://a/\x00")], 1):
        ch.join(
            Conn("e1", i, f"u{i}", name, avatar, True, 1000, "online", 1), rejoin=False, emit=rec
        )
        p = channel_pb2.Publish(conn_id=i, channel_id="c1", content="hi", client_msg_id="k")
        assert ch.publish("e1", p, max_length=50, deadline=0.0, emit=rec) is None
        assert rec.replies[-1][2]["code"] == "invalid_field"
    assert not ch.pending


def test_committed_broadcasts_in_order_acks_and_keeps_recent_window() -> None:
    ch, rec = make_channel(), Recorder()
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    pendings = []
    for i in range(4):
        p = channel_pb2.Publish(
            conn_id=1,
            channel_id="c1",
            content=f"m{i}",
            client_msg_id=f"k{i}",
            client_supplied_id=True,
        )
        pending = ch.publish("e1", p, max_length=100, deadline=0.0, emit=rec)
        assert pending is not None
        pendings.append(pending)
    results = [
        store_pb2.AppendResult(id=p.message.id, seq=i + 1, timestamp_ms=5)
        for i, p in enumerate(pendings)
    ]
    ch.committed(ch.take_pending(), results, 4, rec)
    messages = [b for b in rec.broadcasts if b["frame"]["type"] == "message"]
    assert [b["seq"] for b in messages] == [1, 2, 3, 4]
    acks = [r[2] for r in rec.replies]
    assert [a["clientMsgId"] for a in acks] == ["k0", "k1", "k2", "k3"]
    assert ch.last_seq == 4
    assert [m["content"] for m in ch.recent] == ["m1", "m2", "m3"]
    # A duplicate's re-broadcast does not enter the window twice.
    ch.broadcast_stored(dict(ch.recent[-1]), received_at_ns=0, emit=rec)
    assert [m["seq"] for m in ch.recent] == [2, 3, 4]


def test_big_channels_cap_online_users_and_stop_announcing_joins() -> None:
    ch, rec = make_channel(max_connections=100), Recorder()
    for i in range(4):  # up to presence_fanout_limit=4 connections: announced
        ch.join(conn("e1", i, f"u{i}"), rejoin=False, emit=rec)
    assert rec.types() == ["user_connected"] * 4
    ch.join(conn("e1", 9, "late"), rejoin=False, emit=rec)  # the 5th: not announced
    assert rec.types() == ["user_connected"] * 4
    state = orjson.loads(rec.results[-1][1].initial_state)
    assert state["onlineCount"] == 5
    assert [u["userId"] for u in state["onlineUsers"]] == ["late", "u0", "u1"], (
        "joiner first, capped at 3"
    )
    ch.leave("e1", 0, rec)  # 4 connections left: announced again
    assert rec.types()[-1] == "user_disconnected"


def test_joiner_leads_online_users_below_the_cap_too() -> None:
    ch, rec = make_channel(), Recorder()
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e1", 2, "bob"), rejoin=False, emit=rec)
    state = orjson.loads(rec.results[-1][1].initial_state)
    assert [u["userId"] for u in state["onlineUsers"]] == ["bob", "ann"]
    # A second connection of a user already online leads as well.
    ch.join(conn("e2", 3, "ann"), rejoin=False, emit=rec)
    state = orjson.loads(rec.results[-1][1].initial_state)
    assert [u["userId"] for u in state["onlineUsers"]] == ["ann", "bob"]


def _online(ch: Channel, first: str) -> list[dict[str, Any]]:
    """The channel's encoded ``onlineUsers`` for joiner ``first``, decoded."""
    users: list[dict[str, Any]] = orjson.loads(ch.online_users(first))
    return users


def _expected(ch: Channel, first: str) -> list[dict[str, Any]]:
    """``onlineUsers`` built from scratch out of the live users."""
    users = list(ch.users.values())
    ordered = [u for u in users if u.user_id == first] + [u for u in users if u.user_id != first]
    return [
        {
            "userId": u.user_id,
            "username": u.username,
            "joinedAt": u.joined_at_ms,
            "status": u.status,
        }
        for u in ordered[: ch.policy.online_users_limit]
    ]


def test_encoded_online_users_follow_every_change() -> None:
    ch, rec = make_channel(max_connections=100), Recorder()

    def check(what: str) -> None:
        for first in ["", "nobody", *ch.users]:
            assert _online(ch, first) == _expected(ch, first), f"{what}, joiner {first!r}"

    check("empty channel")
    for i, user in enumerate(["ann", "bob"], start=1):
        ch.join(conn("e1", i, user), rejoin=False, emit=rec)
        check(f"{user} joined")
        state = orjson.loads(rec.results[-1][1].initial_state)
        assert state["onlineUsers"] == _expected(ch, user), "initial_state carries the listing"
    ch.set_presence("e1", 1, "away", rec)
    check("ann went away")
    for i, user in enumerate(["cat", "dan", "eve"], start=3):  # past the limit of 3
        ch.join(conn("e1", i, user), rejoin=False, emit=rec)
        check(f"{user} joined")
    assert [u["userId"] for u in _online(ch, "eve")] == ["eve", "ann", "bob"]
    ch.set_presence("e1", 2, "dnd", rec)
    check("bob busy")
    ch.leave("e1", 1, rec)
    check("ann left")
    assert [u["userId"] for u in _online(ch, "eve")] == ["eve", "bob", "cat"]
    ch.join(conn("e2", 9, "bob"), rejoin=True, emit=rec)
    ch.restore_user("bob", status="online", joined_at_ms=5)
    check("bob restored")
    ch.users["cat"].username = "Catherine"
    check("cat renamed")
    del ch.users["bob"]  # as a shard forgets a user whose channel moved away
    check("bob forgotten")
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    check("ann came back, last")
    assert [u["userId"] for u in _online(ch, "ann")] == ["ann", "cat", "dan"]


def test_every_frame_about_the_channel_carries_its_id() -> None:
    ch, rec = make_channel(), Recorder()
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e1", 2, "bob"), rejoin=False, emit=rec)
    ch.set_typing("e1", 1, True, rec)
    ch.set_presence("e1", 1, "away", rec)
    refused = channel_pb2.Publish(conn_id=1, channel_id="c1", content=" ", client_msg_id="k")
    assert ch.publish("e1", refused, max_length=10, deadline=0.0, emit=rec) is None
    ok = channel_pb2.Publish(conn_id=1, channel_id="c1", content="hi", client_msg_id="k2")
    pending = ch.publish("e1", ok, max_length=10, deadline=0.0, emit=rec)
    assert pending is not None
    result = store_pb2.AppendResult(id=pending.message.id, seq=1, timestamp_ms=5)
    ch.committed(ch.take_pending(), [result], 1, rec)
    ch.leave("e1", 2, rec)
    frames = [b["frame"] for b in rec.broadcasts] + [r[2] for r in rec.replies]
    kinds = {f["type"] for f in frames}
    assert kinds >= {"user_connected", "typing", "presence", "message", "user_disconnected"}
    assert kinds >= {"ack", "error"}
    assert all(f["channelId"] == "c1" for f in frames), frames
    message = next(f for f in frames if f["type"] == "message")
    assert message["message"]["channelId"] == "c1"


def test_linger_keeps_a_departed_user_online_and_a_return_is_silent() -> None:
    ch, rec = make_channel(linger=5.0), Recorder()
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e1", 2, "bob"), rejoin=False, emit=rec)
    ch.set_typing("e1", 1, True, rec)
    ch.leave("e1", 1, rec)
    # Typing stops at once; the departure itself waits for the linger.
    assert rec.types() == ["user_connected", "user_connected", "typing", "typing"]
    assert rec.broadcasts[-1]["frame"]["isTyping"] is False
    assert rec.lingering == ["ann"]
    # A newcomer still sees ann online.
    ch.join(conn("e2", 3, "cat"), rejoin=False, emit=rec)
    state = orjson.loads(rec.results[-1][1].initial_state)
    assert {u["userId"] for u in state["onlineUsers"]} == {"ann", "bob", "cat"}
    before = len(rec.broadcasts)
    ch.join(conn("e2", 4, "ann"), rejoin=False, emit=rec)  # back within the linger
    assert len(rec.broadcasts) == before, "a return within the linger is silent"
    assert not ch.linger_expired("ann", rec), "ann came back: the old departure is void"
    assert len(rec.broadcasts) == before
    ch.leave("e2", 4, rec)
    assert rec.lingering == ["ann", "ann"]
    assert ch.linger_expired("ann", rec)
    assert rec.broadcasts[-1]["frame"] == {
        "type": "user_disconnected",
        "channelId": "c1",
        "userId": "ann",
        "username": "Ann",
    }
    assert "ann" not in ch.users
    assert not ch.linger_expired("ann", rec), "announced once"
    assert rec.types().count("user_disconnected") == 1


def test_a_return_within_the_linger_with_another_status_announces_the_status() -> None:
    ch, rec = make_channel(linger=5.0), Recorder()
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e1", 2, "bob"), rejoin=False, emit=rec)
    ch.set_presence("e1", 1, "away", rec)
    ch.leave("e1", 1, rec)
    ch.join(conn("e1", 3, "ann"), rejoin=False, emit=rec)  # a new connection: online
    assert rec.types()[-1] == "presence" and rec.broadcasts[-1]["frame"]["status"] == "online"
    assert rec.types().count("user_connected") == 2


def test_drop_session_then_linger_announces_once() -> None:
    ch, rec = make_channel(linger=5.0), Recorder()
    ch.join(conn("e1", 1, "ann", session=1), rejoin=False, emit=rec)
    ch.join(conn("e1", 2, "ann", session=1), rejoin=False, emit=rec)
    ch.join(conn("e2", 3, "bob", session=1), rejoin=False, emit=rec)
    assert ch.drop_session("e1", keep_session=None, emit=rec) == 2
    assert rec.lingering == ["ann"], "one linger per user, not per connection"
    assert "user_disconnected" not in rec.types()
    assert ch.linger_expired("ann", rec)
    assert rec.types().count("user_disconnected") == 1


def read_channel(last_seq: int = 10) -> tuple[Channel, Recorder]:
    ch, rec = make_channel(), Recorder()
    ch.last_seq = last_seq
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e2", 2, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e1", 3, "ann"), rejoin=False, emit=rec)
    ch.join(conn("e1", 4, "bob"), rejoin=False, emit=rec)
    return ch, rec


def test_read_tells_the_readers_other_connections_at_once() -> None:
    ch, rec = read_channel()
    assert ch.read("e1", 1, 4, rec) == 4
    assert sorted((edge, cid) for edge, cid, *_ in rec.replies) == [("e1", 3), ("e2", 2)]
    assert {tuple(sorted(r[2].items())) for r in rec.replies} == {
        (("channelId", "c1"), ("seq", 4), ("type", "read"), ("userId", "ann"))
    }
    assert rec.reply_types == ["read", "read"]
    assert not any(final for *_, final in rec.replies)
    assert rec.moved == [("ann", 4)]
    assert ch.cursors == {"ann": 4}


def test_read_never_moves_back_and_is_clamped_to_the_head() -> None:
    ch, rec = read_channel(last_seq=10)
    assert ch.read("e1", 1, 6, rec) == 6
    assert ch.read("e2", 2, 3, rec) == 0, "another device behind: no move back"
    assert ch.read("e1", 1, 6, rec) == 0
    assert ch.read("e1", 1, 99, rec) == 10, "clamped to last_seq"
    assert rec.moved == [("ann", 6), ("ann", 10)]
    assert [r[2]["seq"] for r in rec.replies] == [6, 6, 10, 10]


def test_read_ignores_unknown_connections_and_seq_zero() -> None:
    ch, rec = read_channel()
    assert ch.read("e1", 99, 5, rec) == 0
    assert ch.read("e9", 1, 5, rec) == 0
    assert ch.read("e1", 1, 0, rec) == 0
    empty, rec2 = make_channel(), Recorder()
    empty.join(conn("e1", 1, "ann"), rejoin=False, emit=rec2)
    assert empty.read("e1", 1, 5, rec2) == 0, "nothing to read in an empty channel"
    assert not rec.moved and not rec.replies and not rec2.moved


def test_store_answer_is_authoritative_and_cursor_forgotten_when_gone() -> None:
    ch, rec = read_channel(last_seq=10)
    ch.read("e1", 1, 3, rec)
    ch.stored_cursor("ann", 8)  # the store held a newer cursor
    assert ch.read("e1", 1, 5, rec) == 0
    ch.stored_cursor("ann", 2)  # an older answer never lowers it
    assert ch.cursors["ann"] == 8
    ch.stored_cursor("zed", 4)  # not a member: not cached
    assert "zed" not in ch.cursors
    for edge, cid in [("e1", 1), ("e2", 2), ("e1", 3)]:
        ch.leave(edge, cid, rec)
    assert "ann" not in ch.cursors


def test_sending_moves_the_senders_cursor() -> None:
    ch, rec = read_channel(last_seq=0)
    p = channel_pb2.Publish(conn_id=1, channel_id="c1", content="hi", client_msg_id="k")
    pending = ch.publish("e1", p, max_length=10, deadline=0.0, emit=rec)
    assert pending is not None
    result = store_pb2.AppendResult(id=pending.message.id, seq=1, timestamp_ms=5)
    ch.committed(ch.take_pending(), [result], 1, rec)
    assert rec.moved == [("ann", 1)]
    reads = [(edge, cid, r) for edge, cid, r, _ in rec.replies if r["type"] == "read"]
    assert sorted((edge, cid) for edge, cid, _ in reads) == [("e1", 3), ("e2", 2)], (
        "the sender's other devices; the sending connection has its ack"
    )
    assert all(r["seq"] == 1 and r["userId"] == "ann" for *_, r in reads)


def test_a_commit_moves_each_senders_cursor_once_to_its_newest_message() -> None:
    ch, rec = read_channel(last_seq=0)
    pendings = []
    for i, (edge, cid) in enumerate([("e1", 1), ("e1", 4), ("e2", 2), ("e1", 4)]):
        p = channel_pb2.Publish(conn_id=cid, channel_id="c1", content=f"m{i}", client_msg_id="k")
        pending = ch.publish(edge, p, max_length=10, deadline=0.0, emit=rec)
        assert pending is not None
        pendings.append(pending)
    results = [
        store_pb2.AppendResult(id=p.message.id, seq=i + 1, timestamp_ms=5)
        for i, p in enumerate(pendings)
    ]
    ch.committed(ch.take_pending(), results, 4, rec)
    assert sorted(rec.moved) == [("ann", 3), ("bob", 4)]
    reads = sorted((edge, cid, r["seq"]) for edge, cid, r, _ in rec.replies if r["type"] == "read")
    # ann's newest came from e2/2: her other connections hear of seq 3.
    assert reads == [("e1", 1, 3), ("e1", 3, 3)]


def test_the_recent_window_keeps_the_newest_messages_encoded_in_one_buffer() -> None:
    window = RecentWindow(3)
    bodies = [{"seq": i, "content": f"m{i}", "text": 'é\n"q"'} for i in range(1, 6)]
    for body in bodies:
        window.append(body)
    assert len(window) == 3
    assert list(window) == bodies[2:] and window[0] == bodies[2] and window[-1] == bodies[4]
    # Spliced into a frame unchanged: the same bytes as the bodies themselves.
    assert orjson.dumps({"m": window.fragments()}) == orjson.dumps({"m": bodies[2:]})
    ch = Channel.from_state(
        store_pb2.ChannelState(
            channel_id="c9",
            last_seq=2,
            recent=[
                store_pb2.StoredMessage(id=f"id{i}", seq=i, channel_id="c9", content=f"s{i}")
                for i in (1, 2)
            ],
        ),
        default_max=10,
        policy=ChannelPolicy(recent_limit=2),
    )
    rec = Recorder()
    ch.join(conn("e1", 1, "ann"), rejoin=False, emit=rec)
    ((_, result),) = rec.results
    state = orjson.loads(result.initial_state)
    assert [(m["seq"], m["content"], m["channelId"]) for m in state["messages"]] == [
        (1, "s1", "c9"),
        (2, "s2", "c9"),
    ]
