"""Pure parts of the client: the full-jitter backoff schedule and the
exactly-once sequencer, without any socket."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from waddle_client import Backoff, InitialState, Message, full_jitter_delay
from waddle_client.sequencer import Sequencer


def msg(seq: int) -> Message:
    return Message(
        id=f"id{seq}",
        seq=seq,
        channel_id="c",
        user_id="u",
        username="u",
        content=f"m{seq}",
        timestamp=seq,
    )


def state(last_seq: int, seqs: Sequence[int] = ()) -> InitialState:
    return InitialState("c", tuple(msg(s) for s in seqs), (), last_seq)


@pytest.mark.parametrize(
    ("attempt", "draw", "expected"),
    [
        (0, 0.5, 0.5),
        (1, 0.5, 1.0),
        (2, 0.5, 2.0),
        (4, 0.5, 8.0),
        (5, 0.5, 15.0),  # 32 s ceiling capped at 30
        (60, 0.999, 29.97),
        (500, 0.5, 15.0),  # no overflow for absurd attempts
        (3, 0.0, 0.0),
    ],
)
def test_full_jitter_delay(attempt: int, draw: float, expected: float) -> None:
    assert full_jitter_delay(attempt, draw, base=1.0, cap=30.0) == pytest.approx(expected)


def test_full_jitter_delay_refuses_negative_attempt() -> None:
    with pytest.raises(ValueError):
        full_jitter_delay(-1, 0.5, base=1.0, cap=30.0)


def test_backoff_counts_and_resets_after_a_stable_connection() -> None:
    draws = iter([0.5, 0.5, 0.5, 0.5, 0.5])
    backoff = Backoff(base=1.0, cap=30.0, stable_after=10.0, random=lambda: next(draws))
    assert backoff.next_delay() == (0, 0.5)
    assert backoff.next_delay() == (1, 1.0)
    backoff.connection_lasted(9.99)
    assert backoff.next_delay() == (2, 2.0)
    backoff.connection_lasted(10.0)
    assert backoff.next_delay() == (0, 0.5)
    with pytest.raises(ValueError):
        Backoff(base=0, random=lambda: 0.5)


def test_sequencer_first_state_starts_at_the_window() -> None:
    seq = Sequencer()
    out = seq.on_initial_state(state(60, range(11, 61)), reconnect=False)
    assert [m.seq for m in out.deliver] == list(range(11, 61))
    assert not out.want_sync and seq.last == 60


def test_sequencer_empty_first_state_starts_at_the_head() -> None:
    seq = Sequencer()
    out = seq.on_initial_state(state(7), reconnect=False)
    assert out.deliver == [] and seq.last == 7 and not out.want_sync
    assert [m.seq for m in seq.offer(msg(8)).deliver] == [8]


def test_sequencer_tail_missing_from_first_state_asks_for_sync() -> None:
    seq = Sequencer()
    out = seq.on_initial_state(state(5, [1, 2, 3]), reconnect=False)
    assert [m.seq for m in out.deliver] == [1, 2, 3] and out.want_sync


def test_sequencer_drops_old_and_duplicates_holds_gaps() -> None:
    seq = Sequencer()
    seq.on_initial_state(state(2, [1, 2]), reconnect=False)
    assert seq.offer(msg(2)).deliver == []
    assert seq.offer(msg(1)).deliver == []
    out = seq.offer(msg(5))
    assert out.deliver == [] and out.want_sync and seq.held.keys() == {5}
    assert seq.sync_started() == 2 and seq.sync_outstanding
    assert seq.offer(msg(5)).deliver == []  # already held
    assert [m.seq for m in seq.offer(msg(3)).deliver] == [3]
    assert [m.seq for m in seq.offer(msg(4)).deliver] == [4, 5]
    assert not seq.has_gap
    assert seq.on_sync_complete().want_sync is False
    assert not seq.sync_outstanding


def test_sequencer_reconnect_always_syncs_and_filters_history() -> None:
    seq = Sequencer()
    seq.on_initial_state(state(3, [1, 2, 3]), reconnect=False)
    seq.connection_lost()
    out = seq.on_initial_state(state(5, [2, 3, 4, 5]), reconnect=True)
    assert [m.seq for m in out.deliver] == [4, 5] and out.want_sync


def test_sequencer_history_reset() -> None:
    seq = Sequencer()
    seq.on_initial_state(state(9, [8, 9]), reconnect=False)
    out = seq.on_initial_state(state(1, [1]), reconnect=True)
    assert out.history_reset and [m.seq for m in out.deliver] == [1]


def test_sequencer_gives_up_on_an_unfillable_gap() -> None:
    seq = Sequencer(max_gap_syncs=2)
    seq.on_initial_state(state(1, [1]), reconnect=False)
    seq.offer(msg(4))
    seq.sync_started()
    out = seq.on_sync_complete()  # no progress: ask again
    assert out.want_sync and out.gap_skipped is None
    seq.sync_started()
    out = seq.on_sync_complete()
    assert out.gap_skipped == (2, 3) and [m.seq for m in out.deliver] == [4]
    assert seq.last == 4 and not seq.held


def test_sequencer_progress_resets_the_give_up_count() -> None:
    seq = Sequencer(max_gap_syncs=2)
    seq.on_initial_state(state(1, [1]), reconnect=False)
    seq.offer(msg(6))
    seq.sync_started()
    seq.offer(msg(2))  # progress during the sync
    out = seq.on_sync_complete()
    assert out.want_sync and out.gap_skipped is None
