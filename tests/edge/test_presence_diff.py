"""Coalescing joins and leaves into presence_diff frames."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from edge.presence_diff import JOIN, LEAVE, PresenceCoalescer


def event(user: str) -> bytes:
    return orjson.dumps({"type": "x", "userId": user, "username": user.title()})


class Sink:
    def __init__(self) -> None:
        self.flushes: list[tuple[str, Callable[[str], bytes | None]]] = []

    def __call__(self, channel_id: str, frame_for: Callable[[str], bytes | None]) -> None:
        self.flushes.append((channel_id, frame_for))

    def frame(self, i: int, recipient: str) -> dict[str, Any] | None:
        payload = self.flushes[i][1](recipient)
        return None if payload is None else orjson.loads(payload)


async def test_a_crowd_of_joins_is_one_frame() -> None:
    sink = Sink()
    c = PresenceCoalescer(sink, window=60)
    for i in range(50):
        c.add("ch", JOIN, event(f"u{i}"))
    assert not sink.flushes, "nothing before the window ends"
    c.flush("ch")
    assert len(sink.flushes) == 1
    frame = sink.frame(0, "watcher")
    assert frame is not None and frame["type"] == "presence_diff" and frame["channelId"] == "ch"
    assert [j["userId"] for j in frame["joins"]] == [f"u{i}" for i in range(50)]
    assert frame["joins"][0] == {"userId": "u0", "username": "U0", "status": "online"}
    assert frame["leaves"] == []
    c.flush("ch")
    assert len(sink.flushes) == 1, "an empty window sends nothing"


async def test_a_blip_within_the_window_cancels_out_and_nobody_hears_of_themselves() -> None:
    sink = Sink()
    c = PresenceCoalescer(sink, window=60)
    c.add("ch", LEAVE, event("blip"))
    c.add("ch", JOIN, event("blip"))
    c.add("ch", JOIN, event("fleeting"))
    c.add("ch", LEAVE, event("fleeting"))
    c.add("ch", JOIN, event("ann"))
    c.add("ch", LEAVE, event("bob"))
    c.flush("ch")
    seen = sink.frame(0, "watcher")
    assert seen is not None
    assert [j["userId"] for j in seen["joins"]] == ["ann"]
    assert [v["userId"] for v in seen["leaves"]] == ["bob"]
    own = sink.frame(0, "ann")
    assert (
        own is not None and own["joins"] == [] and [v["userId"] for v in own["leaves"]] == ["bob"]
    )
    c.add("ch", JOIN, event("solo"))
    c.flush("ch")
    assert sink.frame(1, "solo") is None, "a diff about oneself alone is not sent"


async def test_channels_are_separate() -> None:
    sink = Sink()
    c = PresenceCoalescer(sink, window=60)
    c.add("a", JOIN, event("x"))
    c.add("b", LEAVE, event("x"))
    c.flush("a")
    c.flush("b")
    assert [ch for ch, _ in sink.flushes] == ["a", "b"]
    b = sink.frame(1, "y")
    assert b is not None and b["joins"] == [] and b["leaves"][0]["userId"] == "x"
