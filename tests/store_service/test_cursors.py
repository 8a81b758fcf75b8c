"""Read cursors at the repository level (SQLite and PostgreSQL): never back, batches, limits."""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service.cursors import MAX_CURSOR_BATCH, ReadCursor, ReadCursors
from store_service.metrics import StoreMetrics
from store_service.models import ChannelRow, ReadCursorRow
from store_service.repository import MAX_SEQ, InvalidArgument, Repository, Unavailable
from tests.store_service.helpers import exec_sql, group, msg


@pytest.fixture
def cursors(repository: Repository) -> ReadCursors:
    return ReadCursors(repository)


async def with_head(repository: Repository, channel_id: str, head: int) -> None:
    """Give ``channel_id`` ``head`` messages (cursors are bounded by the head)."""
    await repository.append_batch([group(channel_id, 0, *(msg() for _ in range(head)))])


async def count(engine: AsyncEngine, model: type[ChannelRow] | type[ReadCursorRow]) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(model)) or 0)


def cur(user: str, channel: str, seq: int) -> ReadCursor:
    return ReadCursor(user, channel, seq)


async def test_a_cursor_moves_forward_and_never_back(
    repository: Repository, cursors: ReadCursors
) -> None:
    await with_head(repository, "c", 20)
    assert await cursors.set([cur("u", "c", 5)]) == (cur("u", "c", 5),)
    assert await cursors.get("u", "c") == 5
    # A stale write answers with the stored, newer value and changes nothing.
    assert await cursors.set([cur("u", "c", 3)]) == (cur("u", "c", 5),)
    assert await cursors.set([cur("u", "c", 0)]) == (cur("u", "c", 5),)
    assert await cursors.set([cur("u", "c", 5)]) == (cur("u", "c", 5),)
    assert await cursors.get("u", "c") == 5
    assert await cursors.set([cur("u", "c", 12)]) == (cur("u", "c", 12),)
    assert await cursors.get("u", "c") == 12


async def test_a_write_that_does_not_move_a_cursor_leaves_its_row_alone(
    repository: Repository, cursors: ReadCursors, engine: AsyncEngine
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("row versions (xmin) are PostgreSQL's")
    await with_head(repository, "c", 10)
    await cursors.set([cur("u", "c", 5)])

    async def version() -> str:
        async with engine.connect() as conn:
            row_version = await conn.scalar(
                text("SELECT xmin::text FROM read_cursors WHERE user_id = 'u'")
            )
        return str(row_version)

    before = await version()
    await cursors.set([cur("u", "c", 5)])
    await cursors.set([cur("u", "c", 2)])
    assert await version() == before  # no new row version, no dead tuple
    await cursors.set([cur("u", "c", 6)])
    assert await version() != before


async def test_a_batch_writes_many_users_and_channels_and_answers_in_request_order(
    repository: Repository, cursors: ReadCursors, engine: AsyncEngine
) -> None:
    for channel in ("a", "b", "c"):
        await with_head(repository, channel, 10)
    await cursors.set([cur("u1", "a", 6), cur("u2", "b", 4)])

    batch = [
        cur("u2", "b", 9),  # forward
        cur("u1", "a", 2),  # stale: stored 6
        cur("u3", "c", 1),  # new
        cur("u1", "b", 7),  # new, same user, other channel
        cur("u2", "a", 3),  # new, other user, same channel
    ]
    stored = await cursors.set(batch)
    assert stored == (
        cur("u2", "b", 9),
        cur("u1", "a", 6),
        cur("u3", "c", 1),
        cur("u1", "b", 7),
        cur("u2", "a", 3),
    )
    for c in stored:
        assert await cursors.get(c.user_id, c.channel_id) == c.seq
    assert await count(engine, ReadCursorRow) == 5


async def test_a_key_given_twice_is_written_once_with_the_higher_seq(
    repository: Repository, cursors: ReadCursors
) -> None:
    await with_head(repository, "c", 10)
    stored = await cursors.set([cur("u", "c", 4), cur("v", "c", 1), cur("u", "c", 8)])
    assert stored == (cur("u", "c", 8), cur("v", "c", 1), cur("u", "c", 8))
    assert await cursors.get("u", "c") == 8


async def test_an_unknown_cursor_reads_zero(repository: Repository, cursors: ReadCursors) -> None:
    await with_head(repository, "c", 3)
    await cursors.set([cur("u", "c", 2)])
    assert await cursors.get("u", "other") == 0
    assert await cursors.get("other", "c") == 0
    assert await cursors.get("nobody", "nowhere") == 0


async def test_a_cursor_never_passes_the_channel_head(
    repository: Repository, cursors: ReadCursors, engine: AsyncEngine
) -> None:
    await with_head(repository, "c", 10)
    assert await cursors.set([cur("u", "c", 50), cur("v", "c", MAX_SEQ)]) == (
        cur("u", "c", 10),
        cur("v", "c", 10),
    )
    # The head moves on; so can the cursor.
    await repository.append_batch([group("c", 10, msg(), msg())])
    assert await cursors.set([cur("u", "c", 50)]) == (cur("u", "c", 12),)
    # A channel without a row has head 0, and a cursor write creates no channel row.
    assert await cursors.set([cur("u", "ghost", 7)]) == (cur("u", "ghost", 0),)
    assert await cursors.get("u", "ghost") == 0
    assert await count(engine, ChannelRow) == 1


async def test_an_empty_batch_writes_nothing(cursors: ReadCursors, engine: AsyncEngine) -> None:
    assert await cursors.set([]) == ()
    assert await count(engine, ReadCursorRow) == 0


async def test_the_largest_batch_is_written_whole(
    repository: Repository, cursors: ReadCursors, engine: AsyncEngine
) -> None:
    await with_head(repository, "c", 5)
    batch = [cur(f"u{i}", "c", i % 6) for i in range(MAX_CURSOR_BATCH)]
    stored = await cursors.set(batch)
    assert stored == tuple(batch)
    assert await count(engine, ReadCursorRow) == MAX_CURSOR_BATCH
    # Again, half of them stale: the stored values come back for those.
    again = [cur(c.user_id, c.channel_id, 5 - c.seq) for c in batch]
    assert await cursors.set(again) == tuple(
        cur(c.user_id, c.channel_id, max(c.seq, 5 - c.seq)) for c in batch
    )


async def test_concurrent_batches_in_any_order_keep_the_highest(
    repository: Repository, cursors: ReadCursors
) -> None:
    head = 100
    channels = ["a", "b", "c", "d"]
    for channel in channels:
        await with_head(repository, channel, head)
    keys = [(f"u{i}", channel) for i in range(10) for channel in channels]
    rng = random.Random(7)
    batches = []
    for _ in range(12):
        order = keys[:]
        rng.shuffle(order)  # different lock orders, were the store not to sort them
        batches.append([cur(user, channel, rng.randint(1, head)) for user, channel in order])
    results = await asyncio.wait_for(
        asyncio.gather(*(cursors.set(batch) for batch in batches)), timeout=60
    )
    highest = {
        key: max(c.seq for b in batches for c in b if (c.user_id, c.channel_id) == key)
        for key in keys
    }
    for user, channel in keys:
        assert await cursors.get(user, channel) == highest[(user, channel)]
    # Every answer is at least what that batch wrote: nothing moved back.
    for batch, answer in zip(batches, results, strict=True):
        assert all(a.seq >= b.seq for a, b in zip(answer, batch, strict=True))


@pytest.mark.parametrize(
    ("batch", "error"),
    [
        ([cur("", "c", 1)], "user_id is required"),
        ([cur("u", "", 1)], "channel_id is required"),
        ([cur("u\x00", "c", 1)], "user_id contains a NUL"),
        ([cur("u", "c\x00", 1)], "channel_id contains a NUL"),
        ([cur("u", "c", -1)], "seq out of range"),
        ([cur("u", "c", MAX_SEQ + 1)], "seq out of range"),
        ([cur("u", "c", 1)] * (MAX_CURSOR_BATCH + 1), "at most 10000 cursors per call"),
    ],
)
async def test_a_malformed_batch_is_invalid_argument_and_writes_nothing(
    repository: Repository,
    cursors: ReadCursors,
    engine: AsyncEngine,
    batch: list[ReadCursor],
    error: str,
) -> None:
    await with_head(repository, "c", 5)
    good = cur("ok", "c", 2)
    with pytest.raises(InvalidArgument, match=error):
        await cursors.set([good, *batch])
    assert await count(engine, ReadCursorRow) == 0


@pytest.mark.parametrize(
    ("user_id", "channel_id", "error"),
    [
        ("", "c", "user_id is required"),
        ("u", "", "channel_id is required"),
        ("u\x00", "c", "user_id contains a NUL"),
        ("u", "\x00", "channel_id contains a NUL"),
    ],
)
async def test_a_malformed_get_is_invalid_argument(
    cursors: ReadCursors, user_id: str, channel_id: str, error: str
) -> None:
    with pytest.raises(InvalidArgument, match=error):
        await cursors.get(user_id, channel_id)


async def test_cursor_queries_are_timed_and_failures_unavailable_and_counted(
    repository: Repository, cursors: ReadCursors, metrics: StoreMetrics, migrated_url: str
) -> None:
    await with_head(repository, "c", 5)
    await cursors.set([cur("u", "c", 1)])
    await cursors.get("u", "c")

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("waddle_store_query_seconds_count", query="set_read_cursors") == 1
    assert sample("waddle_store_query_seconds_count", query="get_read_cursor") == 1

    exec_sql(migrated_url, "ALTER TABLE read_cursors RENAME TO read_cursors_gone")
    try:
        with pytest.raises(Unavailable, match=r"database unavailable \(set_read_cursors\)"):
            await cursors.set([cur("u", "c", 3)])
        with pytest.raises(Unavailable, match=r"database unavailable \(get_read_cursor\)"):
            await cursors.get("u", "c")
    finally:
        exec_sql(migrated_url, "ALTER TABLE read_cursors_gone RENAME TO read_cursors")
    assert sample("waddle_store_errors_total", op="set_read_cursors") == 1
    assert sample("waddle_store_errors_total", op="get_read_cursor") == 1
    assert await cursors.get("u", "c") == 1  # the failed write wrote nothing
