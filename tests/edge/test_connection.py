"""The edge's delivery rule, per connection: exactly once, in order, held
back while joining or syncing, gaps detected, slow consumers handled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
import pytest

from edge.auth import Identity
from edge.connection import (
    FULL_FLUSH_SOCKETS,
    PRESENCE_WINDOW,
    Connection,
    Limits,
    LocalChannels,
    State,
)
from edge.metrics import EdgeMetrics
from edge.wsframe import text_frame
from waddle_pb import channel_pb2


class MemoryTransport(asyncio.Transport):
    """Collects written bytes; its buffer size is set by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.chunks.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing


def ident(user: str) -> Identity:
    return Identity(user, user, frozenset({"read", "write"}), "", None, 0.0)


def live_conn(
    local: LocalChannels, cid: int, user: str, cursor: int = 0
) -> tuple[Connection, MemoryTransport]:
    conn = Connection(id=cid, channel_id="c", identity=ident(user), joined_at_ms=0)
    transport = MemoryTransport()
    conn.transport = transport
    conn.cursor = conn.floor = cursor
    local.add(conn)
    local.activate(conn)
    return conn, transport


def deliver(
    seq: int,
    *,
    exclude: str = "",
    ephemeral: bool = False,
    kind: str = "message",
    payload: bytes | None = None,
) -> channel_pb2.Deliver:
    return channel_pb2.Deliver(
        channel_id="c",
        payload=f'{{"seq":{seq}}}'.encode() if payload is None else payload,
        seq=seq,
        exclude_user_id=exclude,
        ephemeral=ephemeral,
        type=kind,
    )


def immediately(delay: float, callback: Callable[[], None]) -> None:
    callback()


@pytest.fixture
def local() -> LocalChannels:
    """Flushes at once: each write is visible right away."""
    return LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=100, max_held=5), immediately)


def test_in_order_exactly_once(local: LocalChannels) -> None:
    conn, t = live_conn(local, 1, "a")
    for seq in (1, 2, 2, 1, 3):
        local.deliver(deliver(seq))
    assert t.chunks == [text_frame(f'{{"seq":{s}}}'.encode()) for s in (1, 2, 3)]
    assert conn.cursor == 3


def test_one_frame_built_for_all_sockets(local: LocalChannels) -> None:
    conns = [live_conn(local, i, f"u{i}") for i in range(3)]
    local.deliver(deliver(1))
    frames = [t.chunks[0] for _, t in conns]
    assert frames[0] is frames[1] is frames[2]


def test_gap_holds_and_asks_for_fill(local: LocalChannels) -> None:
    gaps: list[int] = []
    local.on_gap = lambda c: gaps.append(c.id)
    conn, t = live_conn(local, 1, "a")
    local.deliver(deliver(1))
    local.deliver(deliver(3))
    assert gaps == [1] and conn.state is State.SYNCING
    assert conn.held == [(3, b'{"seq":3}')]
    local.deliver(deliver(4))  # held while syncing, no second request
    assert gaps == [1] and len(conn.held) == 2
    conn.cursor = 2  # as if the replay had written seq 2
    assert local.release_held(conn)
    assert conn.cursor == 4
    assert t.chunks[1:] == [text_frame(b'{"seq":3}'), text_frame(b'{"seq":4}')]


def test_joining_connection_holds_then_drops_what_initial_state_covered(
    local: LocalChannels,
) -> None:
    conn = Connection(id=1, channel_id="c", identity=ident("a"), joined_at_ms=0)
    local.add(conn)
    local.deliver(deliver(5))
    local.deliver(deliver(6))
    local.deliver(deliver(0, ephemeral=True, kind="typing"))  # ephemeral: not held
    assert [s for s, _ in conn.held or ()] == [5, 6]
    conn.transport = t = MemoryTransport()
    conn.cursor = conn.floor = 5  # JoinResult said last_seq 5
    local.activate(conn)
    assert conn.state is State.LIVE and conn.cursor == 6 and len(t.chunks) == 1


def test_exclude_user_and_ephemeral(local: LocalChannels) -> None:
    _, ta = live_conn(local, 1, "a")
    _, tb = live_conn(local, 2, "b")
    local.deliver(deliver(0, exclude="a", ephemeral=True, kind="typing"))
    assert ta.chunks == [] and len(tb.chunks) == 1


def test_slow_consumer_drops_ephemeral_and_closes_on_message(local: LocalChannels) -> None:
    slow, ts = live_conn(local, 1, "slow")
    _, tf = live_conn(local, 2, "fast")
    ts.buffered = 1000  # over the 100-byte limit
    local.deliver(deliver(0, ephemeral=True, kind="typing"))
    assert slow.state.value == "live" and ts.chunks == []
    assert local.metrics.dropped_frames.labels("typing")._value.get() == 1
    local.deliver(deliver(1))
    assert slow.state is State.CLOSED
    assert local.metrics.slow_consumer_closes._value.get() == 1
    assert len(tf.chunks) == 2, "the fast member got both frames"


def test_too_many_held_frames_close_the_connection(local: LocalChannels) -> None:
    conn = Connection(id=1, channel_id="c", identity=ident("a"), joined_at_ms=0)
    local.add(conn)
    for seq in range(1, 8):
        local.deliver(deliver(seq))
    assert conn.state is State.CLOSED and len(conn.held or ()) == 5


def test_writes_of_one_turn_are_one_write_per_socket_in_order() -> None:
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=100), timers)
    conn, t = live_conn(local, 1, "a")
    for seq in (1, 2, 3):
        local.deliver(deliver(seq))
    conn.send(b'{"type":"ack"}', local.metrics, local.limits, "ack")
    assert t.chunks == [], "nothing is written before the flush"
    assert [d for d, _ in timers.pending] == [0.0], "one flush, right after this turn"
    timers.run()
    expected = b"".join(text_frame(f'{{"seq":{s}}}'.encode()) for s in (1, 2, 3))
    assert t.chunks == [expected + text_frame(b'{"type":"ack"}')]


def test_a_busy_edge_flushes_at_most_once_an_interval() -> None:
    timers = Timers()
    # A long interval, so that no pause of a loaded machine decides the test.
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=100), timers, write_interval=60.0)
    _, t = live_conn(local, 1, "a")
    cork = local.cork
    cork.full_at = 1  # one socket makes a full flush here
    # Sparse traffic: the last flush's hold is over: flush right after this turn.
    cork.next_at = time.perf_counter() - 1
    local.deliver(deliver(1))
    assert [d for d, _ in timers.pending] == [0.0]
    timers.run()
    assert t.chunks == [text_frame(b'{"seq":1}')]
    # A write right after a flush waits for the rest of the interval, and
    # whatever comes meanwhile shares that flush's write.
    local.deliver(deliver(2))
    assert len(timers.pending) == 1 and 50.0 < timers.pending[0][0] <= 60.0
    local.deliver(deliver(3))
    assert len(timers.pending) == 1, "one flush for the whole interval"
    assert len(t.chunks) == 1
    timers.run()
    assert t.chunks[-1] == text_frame(b'{"seq":2}') + text_frame(b'{"seq":3}')


def test_a_flush_holds_the_next_by_its_share_of_the_sockets() -> None:
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=100), timers, write_interval=60.0)
    cork = local.cork
    members = [live_conn(local, i, f"u{i}") for i in range(FULL_FLUSH_SOCKETS)]
    first, _ = members[0]
    # One socket's ack holds the next flush back by 1/256 of the interval,
    # so the channel's next message does not wait the whole interval for it.
    first.send(b'{"type":"ack"}', local.metrics, local.limits, "ack")
    timers.run()
    local.deliver(deliver(1))
    [(wait, _)] = timers.pending
    assert 0.0 < wait <= 60.0 / FULL_FLUSH_SOCKETS
    # A flush to a quarter of the full count holds a quarter of it.
    cork.full_at = 4 * FULL_FLUSH_SOCKETS
    timers.run()
    local.deliver(deliver(2))
    [(wait, _)] = timers.pending
    assert 60.0 / 4 - 10 < wait <= 60.0 / 4
    # A flush to the full count holds the whole interval.
    cork.full_at = FULL_FLUSH_SOCKETS
    timers.run()
    local.deliver(deliver(3))
    [(wait, _)] = timers.pending
    assert 50.0 < wait <= 60.0
    timers.run()
    assert all(len(t.chunks) == 4 if c is first else len(t.chunks) == 3 for c, t in members)


def test_without_an_interval_every_turn_flushes_at_once() -> None:
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=100), timers, write_interval=0.0)
    live_conn(local, 1, "a")
    for seq in (1, 2):
        local.deliver(deliver(seq))
        assert [d for d, _ in timers.pending] == [0.0]
        timers.run()


class Timers:
    """A scheduler the test runs by hand: (delay, callback) in order."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> None:
        self.pending.append((delay, callback))

    def run(self, delay: float | None = None) -> None:
        """Run the callbacks due after ``delay`` (all when None)."""
        due = [t for t in self.pending if delay is None or t[0] == delay]
        self.pending = [t for t in self.pending if t not in due]
        for _, callback in due:
            callback()


def presence_payload(user: str, kind: str) -> bytes:
    return f'{{"type":"{kind}","userId":"{user}"}}'.encode()


def presence(user: str, kind: str = "user_connected") -> channel_pb2.Deliver:
    """A join or leave, as the owner sends it: not for the user it is about."""
    payload = presence_payload(user, kind)
    return deliver(0, exclude=user, ephemeral=True, kind=kind, payload=payload)


def pframe(user: str, kind: str = "user_connected") -> bytes:
    return text_frame(presence_payload(user, kind))


def test_a_crowd_of_joins_is_one_write_per_socket_in_order() -> None:
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=10_000), timers)
    _, ta = live_conn(local, 1, "a")
    _, tb = live_conn(local, 2, "b")
    for user in ("x", "a", "y"):
        local.deliver(presence(user))
    local.deliver(presence("x", "user_disconnected"))
    timers.run(0.0)
    assert ta.chunks == [] and tb.chunks == [], "joins wait for their window"
    assert [d for d, _ in timers.pending] == [PRESENCE_WINDOW], "one timer per channel"
    timers.run(PRESENCE_WINDOW)  # the batch is corked ...
    timers.run(0.0)  # ... and written
    crowd = [pframe("x"), pframe("a"), pframe("y"), pframe("x", "user_disconnected")]
    assert tb.chunks == [b"".join(crowd)]
    assert ta.chunks == [b"".join(f for f in crowd if f != pframe("a"))], "never told of itself"
    out = local.metrics.frames_out_for
    assert out("user_connected")._value.get() == 5 and out("user_disconnected")._value.get() == 2


def test_a_message_after_joins_sends_them_first() -> None:
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=10_000), timers)
    _, ta = live_conn(local, 1, "a")
    local.deliver(presence("x"))
    local.deliver(deliver(1))
    timers.run(0.0)
    assert ta.chunks == [pframe("x") + text_frame(b'{"seq":1}')]
    timers.run()
    assert len(ta.chunks) == 1, "the window's timer finds nothing left to send"


def test_a_member_going_live_gets_no_join_from_before_its_initial_state() -> None:
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=10_000), timers)
    _, ta = live_conn(local, 1, "a")
    local.deliver(presence("x"))
    late = Connection(id=2, channel_id="c", identity=ident("b"), joined_at_ms=0)
    late.transport = tb = MemoryTransport()
    local.add(late)
    late.send(b'{"type":"initial_state"}', local.metrics, local.limits, "initial_state")
    local.activate(late)  # initial_state already listed x
    local.deliver(presence("y"))
    local.deliver(presence("z"))
    assert [d for d, _ in timers.pending] == [PRESENCE_WINDOW, 0.0], "a join sends no batch"
    timers.run(PRESENCE_WINDOW)
    timers.run(0.0)
    assert ta.chunks == [pframe("x") + pframe("y") + pframe("z")]
    assert tb.chunks == [text_frame(b'{"type":"initial_state"}') + pframe("y") + pframe("z")]


def test_a_leave_after_the_join_result_reaches_a_member_not_live_yet() -> None:
    """The owner answered the join (its initial_state lists x and y), then
    x and y left while the edge was still opening the socket: the joiner
    is told, after its initial_state, though it went live later."""
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=10_000), timers)
    _, ta = live_conn(local, 1, "a")
    local.deliver(presence("w"))  # before the answer: in the initial_state
    joiner = Connection(id=2, channel_id="c", identity=ident("b"), joined_at_ms=0)
    local.add(joiner)
    local.answered(joiner.id)
    local.deliver(presence("x", "user_disconnected"))
    timers.run(PRESENCE_WINDOW)  # this batch goes out while the joiner is not live
    timers.run(0.0)
    local.deliver(presence("y", "user_disconnected"))  # a batch still waiting at activation
    joiner.transport = tb = MemoryTransport()
    joiner.send(b'{"type":"initial_state"}', local.metrics, local.limits, "initial_state")
    local.activate(joiner)
    while timers.pending:
        timers.run()
    left = [pframe("x", "user_disconnected"), pframe("y", "user_disconnected")]
    assert b"".join(tb.chunks) == text_frame(b'{"type":"initial_state"}') + b"".join(left)
    assert b"".join(ta.chunks) == pframe("w") + b"".join(left)


async def test_a_multiplexed_joiner_gets_the_diff_that_came_before_it_went_live() -> None:
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=10_000), timers)
    joiner = Connection(id=1, channel_id="c", identity=ident("m"), joined_at_ms=0)
    joiner.multiplexed = True
    local.add(joiner)
    local.answered(joiner.id)
    local.deliver(presence("x", "user_disconnected"))
    local.presence.flush("c")  # the diff's window ends before the joiner is live
    joiner.transport = tm = MemoryTransport()
    joiner.send(b'{"type":"initial_state"}', local.metrics, local.limits, "initial_state")
    local.activate(joiner)
    timers.run()
    written = b"".join(tm.chunks)
    first = text_frame(b'{"type":"initial_state"}')
    assert written.startswith(first)
    assert orjson.loads(written[len(first) + 2 :]) == {
        "type": "presence_diff",
        "channelId": "c",
        "joins": [],
        "leaves": [{"userId": "x", "username": ""}],
    }


async def test_multiplexed_members_get_a_diff_not_the_batch() -> None:
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=10_000), timers)
    mux, tm = live_conn(local, 1, "m")
    mux.multiplexed = True
    _, tb = live_conn(local, 2, "b")
    local.deliver(presence("x"))
    timers.run()
    timers.run()
    assert tb.chunks == [pframe("x")] and tm.chunks == []
    local.presence.flush("c")  # the diff's own window ends
    timers.run()
    assert [orjson.loads(c[2:]) for c in tm.chunks] == [
        {
            "type": "presence_diff",
            "channelId": "c",
            "joins": [{"userId": "x", "username": "", "status": "online"}],
            "leaves": [],
        }
    ]


def test_a_slow_consumer_drops_the_batch_whole() -> None:
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=100), timers)
    _, slow = live_conn(local, 1, "slow")
    slow.buffered = 1000
    local.deliver(presence("x"))
    local.deliver(presence("y"))
    timers.run()
    assert slow.chunks == []
    assert local.metrics.dropped_frames.labels("user_connected")._value.get() == 2


def test_a_frame_from_the_edge_does_not_overtake_waiting_joins() -> None:
    timers = Timers()
    local = LocalChannels(EdgeMetrics(), Limits(send_buffer_bytes=10_000), timers)
    conn, ta = live_conn(local, 1, "a")
    _, tb = live_conn(local, 2, "b")
    local.deliver(presence("x"))
    conn.send(b'{"type":"pong"}', local.metrics, local.limits, "pong")
    timers.run(0.0)
    assert ta.chunks == [pframe("x") + text_frame(b'{"type":"pong"}')]
    assert tb.chunks == [pframe("x")], "the batch went to every member"
