"""``CursorReads``: joiners' cursors read in batches, and a store that fails
or hangs costs a join no more than the single read did (None in time)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from edge.cursor_reads import CursorKey, CursorReads
from waddle_common.store_client import StoreUnavailable

TIMEOUT = 0.2


class FakeStore:
    """Cursors by key; each call recorded; ``gate`` holds calls until set."""

    def __init__(self, cursors: dict[CursorKey, int] | None = None) -> None:
        self.cursors = cursors or {}
        self.calls: list[list[CursorKey]] = []
        self.called = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: Exception | None = None
        self.hang = False
        self.bad_users: set[str] = set()

    async def fetch(self, keys: Sequence[CursorKey], timeout: float) -> list[int]:
        self.calls.append(list(keys))
        self.called.set()
        # As a gRPC call does: the deadline ends the call.
        async with asyncio.timeout(timeout):
            await self.gate.wait()
            if self.hang:
                await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        if any(user in self.bad_users for user, _ in keys):
            raise ValueError("malformed key")
        return [self.cursors.get(key, 0) for key in keys]


async def test_joins_of_one_tick_share_one_call() -> None:
    store = FakeStore({(f"u{i}", "c"): i for i in range(100)})
    reads = CursorReads(store.fetch, timeout=TIMEOUT)
    got = await asyncio.gather(*(reads.get(f"u{i}", "c") for i in range(150)))
    assert got == [i if i < 100 else 0 for i in range(150)]
    assert len(store.calls) == 1
    assert len(store.calls[0]) == 150


async def test_joins_during_a_call_go_in_the_next_one_and_keys_are_shared() -> None:
    store = FakeStore({("a", "c"): 3, ("b", "c"): 4, ("a", "d"): 5})
    reads = CursorReads(store.fetch, timeout=5.0)
    store.gate.clear()
    first = asyncio.ensure_future(reads.get("a", "c"))
    await asyncio.wait_for(store.called.wait(), 1.0)
    later = [
        asyncio.ensure_future(reads.get(user, channel))
        for user, channel in [("b", "c"), ("a", "d"), ("b", "c"), ("z", "c")]
    ]
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(store.calls) == 1  # the rest wait for the call in flight
    store.gate.set()
    assert await first == 3
    assert await asyncio.gather(*later) == [4, 5, 4, 0]
    assert store.calls == [[("a", "c")], [("b", "c"), ("a", "d"), ("z", "c")]]


async def test_batches_are_split_at_max_batch() -> None:
    store = FakeStore()
    reads = CursorReads(store.fetch, timeout=TIMEOUT, max_batch=4, max_in_flight=3)
    got = await asyncio.gather(*(reads.get(f"u{i}", "c") for i in range(10)))
    assert got == [0] * 10
    assert [len(call) for call in store.calls] == [4, 4, 2]


async def test_an_unavailable_store_answers_none_and_the_next_batch_is_read() -> None:
    store = FakeStore({("a", "c"): 7})
    reads = CursorReads(store.fetch, timeout=TIMEOUT)
    store.error = StoreUnavailable("UNAVAILABLE: down")
    assert await asyncio.gather(reads.get("a", "c"), reads.get("b", "c")) == [None, None]  # type: ignore[comparison-overlap]
    store.error = None
    assert await reads.get("a", "c") == 7


async def test_another_error_reaches_only_the_join_at_fault() -> None:
    store = FakeStore({("a", "c"): 4, ("b", "c"): 6})
    reads = CursorReads(store.fetch, timeout=TIMEOUT)
    store.bad_users = {"\x00"}
    got = await asyncio.gather(
        reads.get("a", "c"), reads.get("\x00", "c"), reads.get("b", "c"), return_exceptions=True
    )
    assert got[0] == 4 and got[2] == 6
    assert isinstance(got[1], ValueError)
    # The batch, then each of its keys alone.
    assert [len(call) for call in store.calls] == [3, 1, 1, 1]
    store.bad_users = set()
    assert await reads.get("\x00", "c") == 0


async def test_a_hung_store_answers_none_within_the_timeout_then_recovers() -> None:
    store = FakeStore({("a", "c"): 2})
    reads = CursorReads(store.fetch, timeout=TIMEOUT)
    store.hang = True
    start = time.monotonic()
    first = asyncio.ensure_future(reads.get("a", "c"))
    await asyncio.wait_for(store.called.wait(), 1.0)
    # Asked while the hung call holds the only slot: still None in time.
    assert await asyncio.gather(first, reads.get("b", "c")) == [None, None]  # type: ignore[comparison-overlap]
    assert time.monotonic() - start < 3 * TIMEOUT + 0.5
    store.hang = False
    assert await reads.get("a", "c") == 2


async def test_a_join_that_gives_up_does_not_cancel_the_others_read() -> None:
    store = FakeStore({("a", "c"): 1, ("b", "c"): 2})
    reads = CursorReads(store.fetch, timeout=5.0)
    store.gate.clear()
    quitter = asyncio.ensure_future(reads.get("a", "c"))
    stayer = asyncio.ensure_future(reads.get("a", "c"))
    await asyncio.wait_for(store.called.wait(), 1.0)
    quitter.cancel()
    store.gate.set()
    assert await stayer == 1
    assert quitter.cancelled()


async def test_close_answers_the_waiting_joins_with_none() -> None:
    store = FakeStore()
    reads = CursorReads(store.fetch, timeout=5.0)
    store.gate.clear()
    waiting = asyncio.ensure_future(reads.get("a", "c"))
    await asyncio.wait_for(store.called.wait(), 1.0)
    queued = asyncio.ensure_future(reads.get("b", "c"))
    await asyncio.sleep(0)
    await reads.close()
    assert await asyncio.wait_for(asyncio.gather(waiting, queued), 1.0) == [None, None]  # type: ignore[comparison-overlap]


def test_bad_limits_are_refused() -> None:
    store = FakeStore()
    with pytest.raises(ValueError, match="must be positive"):
        CursorReads(store.fetch, timeout=0)
