"""Read-receipt coalescing without I/O: at most one receipt per user and
channel per interval, the newest seq wins, keys are independent."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from channel_service.metrics import ChannelMetrics
from channel_service.receipts import CursorWriter, ReceiptCoalescer
from waddle_pb import store_pb2


def test_first_receipt_goes_at_once_later_ones_coalesce_to_the_newest() -> None:
    c = ReceiptCoalescer(1.0)
    key = ("c", "ann")
    assert c.offer(key, 1, now=10.0) == 1
    assert c.offer(key, 2, now=10.2) is None
    assert c.offer(key, 5, now=10.5) is None
    assert c.next_due() == 11.0
    assert c.due(10.99) == []
    assert c.due(11.0) == [(key, 5)]
    # The deferred receipt counts as the last one sent.
    assert c.offer(key, 6, now=11.5) is None
    assert c.due(12.0) == [(key, 6)]
    assert c.offer(key, 7, now=13.5) == 7, "quiet for an interval: at once again"


def test_ten_reads_within_a_second_give_at_most_two_receipts() -> None:
    c = ReceiptCoalescer(1.0)
    key = ("c", "ann")
    sent: list[int] = []
    for i in range(10):
        now = 50.0 + i * 0.09
        got = c.offer(key, i + 1, now)
        if got is not None:
            sent.append(got)
        sent.extend(seq for _, seq in c.due(now))
    sent.extend(seq for _, seq in c.due(52.0))
    assert len(sent) <= 2 and sent[-1] == 10
    assert len(c) == 0


def test_users_and_channels_are_coalesced_separately() -> None:
    c = ReceiptCoalescer(1.0)
    assert c.offer(("c", "ann"), 1, now=0.0) == 1
    assert c.offer(("c", "bob"), 1, now=0.1) == 1
    assert c.offer(("d", "ann"), 1, now=0.2) == 1
    assert c.offer(("c", "bob"), 2, now=0.3) is None
    assert c.offer(("c", "ann"), 3, now=0.4) is None
    assert c.due(1.05) == [(("c", "ann"), 3)]
    assert c.due(1.1) == [(("c", "bob"), 2)]


class RecordingStore:
    """A cursor store that records each call and when it came."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[tuple[str, str], int]]] = []
        self.called = asyncio.Event()

    async def set_read_cursors(
        self, cursors: Sequence[tuple[str, str, int]]
    ) -> list[store_pb2.ReadCursor]:
        self.calls.append(
            (asyncio.get_running_loop().time(), {(u, c): seq for u, c, seq in cursors})
        )
        self.called.set()
        return [store_pb2.ReadCursor(user_id=u, channel_id=c, seq=s) for u, c, s in cursors]


async def test_cursors_that_move_within_the_interval_share_one_store_call() -> None:
    store = RecordingStore()
    stored: list[int] = []
    writer = CursorWriter(
        store,
        ChannelMetrics(),
        stored=lambda cursors: stored.extend(c.seq for c in cursors),
        min_interval=0.2,
    )
    writer.start()
    try:
        writer.put("ann", "c", 1)
        async with asyncio.timeout(10):
            await store.called.wait()
        store.called.clear()
        # A sender's cursor moving with each message, and a reader's.
        for seq in range(2, 40):
            writer.put("ann", "c", seq)
        writer.put("bob", "c", 7)
        async with asyncio.timeout(10):
            await store.called.wait()
        assert [batch for _, batch in store.calls] == [
            {("ann", "c"): 1},
            {("ann", "c"): 39, ("bob", "c"): 7},
        ]
        assert store.calls[1][0] - store.calls[0][0] >= 0.2
        assert writer.pending == 0
    finally:
        writer.put("cid", "c", 3)
        await writer.stop()
    assert store.calls[-1][1] == {("cid", "c"): 3}, "stop writes what is pending at once"
