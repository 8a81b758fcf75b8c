"""The channel actor without I/O: membership, presence, typing, capacity,
publish validation and in-order broadcast of committed messages."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import orjson

from channel_service.channel import Channel, ChannelPolicy, Conn
from waddle_pb import channel_pb2, store_pb2


@dataclass
class Recorder:
    broadcasts: list[dict[str, Any]] = field(default_factory=list)
    replies: list[tuple[str, int, dict[str, Any], bool]] = field(default_factory=list)
    results: list[tuple[str, channel_pb2.JoinResult]] = field(default_factory=list)

    def broadcast(self, channel: Channel, payload: bytes, **kw: Any) -> None:
        self.broadcasts.append({"frame": orjson.loads(payload), "edges": dict(channel.edges), **kw})

    def reply(self, edge_id: str, conn_id: int, channel_id: str, payload: bytes, **kw: Any) -> None:
        self.replies.append((edge_id, conn_id, orjson.loads(payload), kw.get("final", False)))

    def join_result(self, edge_id: str, result: channel_pb2.JoinResult) -> None:
        self.results.append((edge_id, result))

    def types(self) -> list[str]:
        return [b["frame"]["type"] for b in self.broadcasts]


def make_channel(max_connections: int = 10) -> Channel:
    return Channel(
        channel_id="c1",
        last_seq=0,
        max_connections=max_connections,
        policy=ChannelPolicy(recent_limit=3, online_users_limit=3, presence_fanout_limit=4),
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
    assert all(final for *_, final in rec.replies)
    assert pub(2, "hi") is not None and len(ch.pending) == 1


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
