"""Pure parts of the v1.1 client, without any socket: channel ids, the frame
budget, a resumed subscription in the sequencer, the per-channel state
(online users, presence_diff, read cursor and unread count, control
frames), the shared outbox across channels, and the new wire events."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from waddle_client import (
    ErrorEvent,
    Event,
    InitialState,
    Message,
    PresenceDiff,
    ReadReceipt,
    SendError,
    valid_channel_id,
)
from waddle_client.channel import ChannelState
from waddle_client.events import Ack
from waddle_client.multiplexed import FrameBudget
from waddle_client.outbox import Outbox
from waddle_client.sequencer import Sequencer


def body(seq: int, user: str = "bob", **extra: Any) -> dict[str, Any]:
    return {
        "id": f"id{seq}",
        "seq": seq,
        "channelId": "c",
        "userId": user,
        "username": user,
        "content": f"m{seq}",
        "timestamp": seq,
        **extra,
    }


def initial(
    last_seq: int, seqs: Sequence[int] = (), *, me: str = "me", **extra: Any
) -> dict[str, Any]:
    return {
        "type": "initial_state",
        "channelId": "c",
        "messages": [body(s) for s in seqs],
        "onlineUsers": [{"userId": me, "username": me, "status": "online", "joinedAt": 1}],
        "onlineCount": 1,
        "lastSeq": last_seq,
        **extra,
    }


class Harness:
    """A ChannelState with its events and wake-ups recorded."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.wakes = 0
        self.woken = asyncio.Event()
        self.state = ChannelState(
            "c",
            emit=self.events.append,
            wake=self._wake,
            random=lambda: 0.5,
            backoff_base=0.01,
            backoff_cap=0.04,
            max_gap_syncs=3,
            multiplexed=True,
        )

    def _wake(self) -> None:
        self.wakes += 1
        self.woken.set()

    def seqs(self) -> list[int]:
        return [e.seq for e in self.events if isinstance(e, Message)]


# -- small pieces ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel_id", "ok"),
    [
        ("general", True),
        ("a", True),
        ("Team_1.room:2-b", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("-leading", False),
        ("has space", False),
        ("bad\nid", False),
        ("slash/no", False),
        (None, False),
    ],
)
def test_valid_channel_id(channel_id: object, ok: bool) -> None:
    assert valid_channel_id(channel_id) is ok


def test_frame_budget_spends_the_burst_then_paces_at_the_rate() -> None:
    budget = FrameBudget(rate=10.0, burst=3)
    assert [budget.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.take(0.0) == pytest.approx(0.1)  # the 4th waits for one token
    assert budget.take(0.0) == pytest.approx(0.2)  # and the 5th for two
    # After a quiet second the bucket is full again, never more than the burst.
    assert budget.take(10.0) == 0.0
    assert budget.tokens == pytest.approx(2.0)
    with pytest.raises(ValueError):
        FrameBudget(rate=0, burst=1)


def test_sequencer_resume_counts_the_replay_as_the_sync() -> None:
    seq = Sequencer()
    seq.on_initial_state(InitialState.from_wire(initial(3, [1, 2, 3])), reconnect=False)
    seq.connection_lost()
    out = seq.on_resume(InitialState.from_wire(initial(6)), 3)
    assert out.deliver == [] and not out.want_sync and seq.sync_outstanding
    assert [m.seq for m in seq.offer(Message.from_wire(body(5))).deliver] == []
    assert [m.seq for m in seq.offer(Message.from_wire(body(4))).deliver] == [4, 5]
    assert [m.seq for m in seq.offer(Message.from_wire(body(6))).deliver] == [6]
    assert not seq.on_sync_complete().want_sync and not seq.sync_outstanding


def test_sequencer_resume_behind_the_position_is_a_history_reset() -> None:
    seq = Sequencer()
    seq.on_initial_state(InitialState.from_wire(initial(9, [8, 9])), reconnect=False)
    out = seq.on_resume(InitialState.from_wire(initial(2)), 9)
    assert out.history_reset and seq.last == 2
    assert [m.seq for m in seq.offer(Message.from_wire(body(3))).deliver] == [3]


def test_wire_events_of_v11() -> None:
    diff = PresenceDiff.from_wire(
        {
            "type": "presence_diff",
            "channelId": "c",
            "joins": [{"userId": "u1", "username": "Ann", "status": "away"}, "junk"],
            "leaves": [{"userId": "u2", "username": "Bo"}],
        }
    )
    assert diff.channel_id == "c"
    assert [(u.user_id, u.status) for u in diff.joins] == [("u1", "away")]
    assert [u.user_id for u in diff.leaves] == ["u2"]
    assert PresenceDiff.from_wire({"joins": None}).joins == ()
    read = ReadReceipt.from_wire({"type": "read", "channelId": "c", "userId": "u", "seq": 4})
    assert (read.user_id, read.seq, read.own) == ("u", 4, False)
    state = InitialState.from_wire(initial(5, readSeq=2, unreadCount=3))
    assert (state.read_seq, state.unread_count, state.online_count) == (2, 3, 1)
    assert InitialState.from_wire(initial(5)).read_seq is None
    error = ErrorEvent.from_wire(
        {"type": "error", "channelId": "c", "code": "channel_full", "retryAfterMs": 5000}
    )
    assert (error.channel_id, error.retry_after) == ("c", 5.0)
    root = Message.from_wire(body(1, replyCount=12))
    assert root.reply_count == 12


# -- per-channel state ------------------------------------------------------------


async def test_state_online_users_follow_presence_and_diffs() -> None:
    h = Harness()
    h.state.opened(initial(0), reconnect=False, resumed_after=None)
    assert h.state.user_id == "me" and set(h.state.online) == {"me"}
    h.state.handle(
        "presence_diff",
        {"joins": [{"userId": "ann", "username": "Ann", "status": "dnd"}], "leaves": []},
    )
    assert h.state.online["ann"].status == "dnd"
    h.state.handle("presence", {"userId": "ann", "username": "Ann", "status": "away"})
    assert h.state.online["ann"].status == "away"
    h.state.handle("presence_diff", {"joins": [], "leaves": [{"userId": "ann"}]})
    assert set(h.state.online) == {"me"}
    assert [type(e).__name__ for e in h.events] == [
        "InitialState",
        "PresenceDiff",
        "Presence",
        "PresenceDiff",
    ]
    assert h.state.handle("no_such_frame", {}) is False


async def test_state_unread_count_from_initial_state_messages_and_reads() -> None:
    h = Harness()
    h.state.opened(initial(10, range(1, 11), readSeq=4, unreadCount=6), reconnect=False,
                   resumed_after=None)  # fmt: skip
    assert (h.state.read_seq, h.state.unread_count) == (4, 6)
    h.state.handle("message", {"message": body(11)})  # from someone else
    assert h.state.unread_count == 7
    # Another device of this user read up to 9: applied as a maximum.
    h.state.handle("read", {"userId": "me", "seq": 9})
    h.state.handle("read", {"userId": "me", "seq": 5})
    assert (h.state.read_seq, h.state.unread_count) == (9, 2)
    receipts = [e for e in h.events if isinstance(e, ReadReceipt)]
    assert [(r.seq, r.own) for r in receipts] == [(9, True), (5, True)]
    # Someone else's receipt changes nothing here.
    h.state.handle("read", {"userId": "bob", "seq": 11})
    assert h.state.read_seq == 9 and not [e for e in h.events if isinstance(e, ReadReceipt)][-1].own
    # A message of this user (any device) moves the cursor to it.
    h.state.handle("message", {"message": body(12, user="me")})
    assert (h.state.read_seq, h.state.unread_count) == (12, 0)
    # So does the ack of one sent from here.
    h.state.acked(Ack("k", "id13", 13, 0))
    assert (h.state.read_seq, h.state.head, h.state.unread_count) == (13, 13, 0)


async def test_state_unknown_cursor_is_none_until_known() -> None:
    h = Harness()
    h.state.opened(initial(3, [1, 2, 3]), reconnect=False, resumed_after=None)
    assert h.state.read_seq is None and h.state.unread_count is None
    assert h.state.mark_read(None) == 3
    assert h.state.unread_count == 0


async def test_state_mark_read_never_moves_back_and_is_sent_once() -> None:
    h = Harness()
    h.state.opened(initial(10, range(1, 11), readSeq=2), reconnect=False, resumed_after=None)
    h.state.control_frames()  # nothing due from the first state
    assert h.state.mark_read(6) == 6
    assert h.state.control_frames() == [{"type": "read", "seq": 6, "channelId": "c"}]
    assert h.state.control_frames() == []
    assert h.state.mark_read(3) == 6  # behind the cursor: nothing
    assert h.state.control_frames() == []
    assert h.state.mark_read(50) == 10  # capped at the channel's head
    assert h.state.mark_read(None) == 10
    assert h.state.control_frames() == [{"type": "read", "seq": 10, "channelId": "c"}]
    # A drop before the server stored it: sent again after the resubscription.
    h.state.lost()
    h.state.opened(initial(10, readSeq=6), reconnect=True, resumed_after=10)
    assert h.state.read_seq == 10
    assert {"type": "read", "seq": 10, "channelId": "c"} in h.state.control_frames()


async def test_state_control_frames_after_a_resubscription() -> None:
    h = Harness()
    h.state.opened(initial(2, [1, 2]), reconnect=False, resumed_after=None)
    h.state.presence = "dnd"
    h.state.lost()
    h.state.opened(initial(5), reconnect=True, resumed_after=2)
    # The replay is under way: no sync of its own; the presence is re-announced.
    assert h.state.control_frames() == [{"type": "presence", "status": "dnd", "channelId": "c"}]
    for seq in (3, 4, 5):
        h.state.handle("message", {"message": body(seq)})
    h.state.handle("sync_complete", {"lastSeq": 5, "count": 3})
    assert h.seqs() == [1, 2, 3, 4, 5]
    assert h.state.control_frames() == []


async def test_state_gap_asks_for_a_sync_and_a_refused_one_is_asked_again() -> None:
    h = Harness()
    h.state.opened(initial(1, [1]), reconnect=False, resumed_after=None)
    h.state.handle("message", {"message": body(3)})
    assert h.state.control_frames() == [{"type": "sync", "afterSeq": 1, "channelId": "c"}]
    # The replay budget refused it: asked again after retryAfterMs.
    h.woken.clear()
    h.state.on_error(ErrorEvent("rate_limited", "Rate limited", True, retry_after=0.05))
    assert h.state.control_frames() == []
    await asyncio.wait_for(h.woken.wait(), 2)
    assert h.state.control_frames() == [{"type": "sync", "afterSeq": 1, "channelId": "c"}]
    h.state.handle("message", {"message": body(2)})
    assert h.seqs() == [1, 2, 3]


# -- the shared outbox ----------------------------------------------------------------


def outbox(**kw: Any) -> Outbox:
    kw.setdefault("max_in_flight", 8)
    return Outbox(wake=lambda: None, random=lambda: 0.5, backoff_base=0.01, backoff_cap=0.04, **kw)


async def test_outbox_writes_only_subscribed_channels_in_order() -> None:
    box = outbox()
    a1 = box.enqueue("a1", None, channel_id="a")
    b1 = box.enqueue("b1", None, channel_id="b")
    a2 = box.enqueue("a2", "root", channel_id="a")
    live = {"b"}

    def writable(channel: str | None) -> bool:
        return channel in live

    assert box.take(1, writable) is b1
    assert box.take(1, writable) is None  # channel a is not subscribed yet
    live.add("a")
    assert box.take(1, writable) is a1
    assert box.take(1, writable) is a2
    assert '"channelId":"a"' in a2.frame and '"threadId":"root"' in a2.frame
    # A new socket: all due again, same order; a retryable refusal of a1
    # holds a2 back, not channel b.
    b2 = box.enqueue("b2", None, channel_id="b")
    box.reset()
    box.on_error(ErrorEvent("unavailable", "x", True, client_msg_id=a1.client_msg_id))
    assert [box.take(2, writable), box.take(2, writable)] == [b1, b2]
    assert box.take(2, writable) is None
    box.fail(lambda: RuntimeError("gone"), channel_id="a")
    assert list(box.pending) == [b1.client_msg_id, b2.client_msg_id]
    assert isinstance(a2.future.exception(), RuntimeError)


@pytest.mark.parametrize(
    ("content", "thread_id", "code"),
    [
        ("   ", None, "empty_message"),
        ("x" * 11, None, "message_too_long"),
        ("nul\x00", None, "invalid_field"),
        ("ok", "", "invalid_field"),
        ("ok", "t" * 129, "invalid_field"),
    ],
)
async def test_outbox_refuses_what_the_server_would_refuse_unnamed(
    content: str, thread_id: str | None, code: str
) -> None:
    box = outbox(max_message_length=10)
    with pytest.raises(SendError) as info:
        box.enqueue(content, thread_id, channel_id="a")
    assert info.value.code == code
    assert box.pending == {}
