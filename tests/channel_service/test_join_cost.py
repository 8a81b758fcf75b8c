"""The owner's per-join work: the recent window's encoded messages are made
once between appends, a join result reaches its edge's stream whole
without the deep copy of the message, and an online member's cached
``onlineUsers`` entry costs about its length."""

from __future__ import annotations

import tracemalloc

import orjson
import pytest

from channel_service.channel import OnlineUser, RecentWindow
from channel_service.hub import Session
from tests.channel_service.test_hub import ScriptedStore, make_hub
from waddle_pb import channel_pb2


def test_the_window_fragments_are_reused_until_the_next_append() -> None:
    window = RecentWindow(3)
    bodies = [{"seq": i, "content": f"m{i}"} for i in range(1, 5)]
    for body in bodies[:3]:
        window.append(body)
    first = window.fragments()
    assert window.fragments() is first  # a join storm's joins share them
    assert orjson.dumps(list(first)) == orjson.dumps(bodies[:3])
    window.append(bodies[3])
    after = window.fragments()
    assert after is not first
    assert orjson.dumps(list(after)) == orjson.dumps(bodies[1:])


@pytest.mark.parametrize(
    "result",
    [
        channel_pb2.JoinResult(
            conn_id=7, channel_id="c", ok=True, initial_state=b'{"x":1}' * 5000, last_seq=42
        ),
        channel_pb2.JoinResult(conn_id=8, channel_id="c", ok=False, refusal="channel_full"),
        channel_pb2.JoinResult(),  # every field at its default: still a join result
    ],
)
async def test_a_join_result_reaches_the_edge_stream_whole(
    result: channel_pb2.JoinResult,
) -> None:
    hub = make_hub(ScriptedStore([]))
    session = Session("e1", 1)
    hub.sessions["e1"] = session
    hub.join_result("e1", result)
    [event] = session.out
    assert event.WhichOneof("kind") == "join_result"
    assert event == channel_pb2.ShardEvent(join_result=result)


def test_a_cached_online_user_entry_takes_about_its_length() -> None:
    """orjson returns its 4 KiB working buffer; a member's cached entry,
    kept while the member is online, must not cost that much."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        users = [OnlineUser(f"u{i}", f"user {i}", 1_796_212_118_635, "online") for i in range(500)]
        entries = [u.json() for u in users]
        per_user = (tracemalloc.get_traced_memory()[0] - before) / len(users)
    finally:
        tracemalloc.stop()
    assert orjson.loads(entries[7])["username"] == "user 7"
    assert per_user < 1024, f"{per_user:.0f} bytes per online user"
