"""The linger queue without I/O: deadlines in order, a repeated departure
restarts its linger, due departures come out once."""

from __future__ import annotations

from channel_service.presence import LingerQueue


def test_departures_come_due_after_the_linger_in_order() -> None:
    q = LingerQueue(5.0)
    assert q.next_deadline() is None
    q.depart("c", "ann", now=100.0)
    q.depart("c", "bob", now=101.0)
    q.depart("d", "ann", now=102.0)
    assert q.next_deadline() == 105.0
    assert q.due(104.9) == []
    assert q.due(105.0) == [("c", "ann")]
    assert q.due(107.5) == [("c", "bob"), ("d", "ann")]
    assert q.due(1000.0) == [] and len(q) == 0


def test_leaving_again_restarts_the_linger() -> None:
    q = LingerQueue(5.0)
    q.depart("c", "ann", now=100.0)
    q.depart("c", "bob", now=101.0)
    assert q.depart("c", "ann", now=103.0) == 108.0  # came back, left again
    assert len(q) == 2
    assert q.due(105.0) == [], "ann's first departure no longer counts"
    assert q.due(106.0) == [("c", "bob")]
    assert q.next_deadline() == 108.0
    assert q.due(108.0) == [("c", "ann")]
