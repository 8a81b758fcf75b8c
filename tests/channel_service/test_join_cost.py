"""The owner's per-join work: the recent window's encoded messages are made
once between appends, and a join result reaches its edge's stream whole
without the deep copy of the message."""

from __future__ import annotations

import orjson
import pytest

from channel_service.channel import RecentWindow
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
