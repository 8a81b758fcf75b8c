"""History pages at the repository level (SQLite and PostgreSQL): paging, threads, reply counts."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service.history import MAX_HISTORY_LIMIT, HistoryReader
from store_service.metrics import StoreMetrics
from store_service.models import ChannelRow
from store_service.repository import (
    MAX_SEQ,
    ChannelSettings,
    InvalidArgument,
    MessagePage,
    NewMessage,
    Repository,
    Unavailable,
)
from tests.store_service.helpers import exec_sql, group, msg


@pytest.fixture
def history(repository: Repository) -> HistoryReader:
    return HistoryReader(repository)


async def append(repository: Repository, channel_id: str, *messages: NewMessage) -> list[int]:
    """Append ``messages`` after the channel's head; return their seqs."""
    head = (await repository.recent_messages(channel_id, 1)).last_seq
    [result] = await repository.append_batch([group(channel_id, head, *messages)])
    return [r.seq for r in result.results]


async def fill(repository: Repository, channel_id: str, count: int) -> None:
    await append(repository, channel_id, *(msg(f"m{i}") for i in range(1, count + 1)))


def seqs(page: MessagePage) -> list[int]:
    return [m.seq for m in page.messages]


async def channel_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(ChannelRow)) or 0)


# --- paging the whole channel -----------------------------------------------------------


async def test_pages_back_from_the_newest_oldest_first(
    repository: Repository, history: HistoryReader
) -> None:
    await fill(repository, "c", 7)

    newest = await history.page("c", limit=3)
    assert (seqs(newest), newest.has_more, newest.last_seq) == ([5, 6, 7], True, 7)
    assert [m.content for m in newest.messages] == ["m5", "m6", "m7"]

    middle = await history.page("c", before_seq=newest.messages[0].seq, limit=3)
    assert (seqs(middle), middle.has_more, middle.last_seq) == ([2, 3, 4], True, 7)

    oldest = await history.page("c", before_seq=middle.messages[0].seq, limit=3)
    assert (seqs(oldest), oldest.has_more, oldest.last_seq) == ([1], False, 7)

    past_the_start = await history.page("c", before_seq=1, limit=3)
    assert (seqs(past_the_start), past_the_start.has_more, past_the_start.last_seq) == (
        [],
        False,
        7,
    )


async def test_exact_page_edges_say_whether_older_messages_exist(
    repository: Repository, history: HistoryReader
) -> None:
    await fill(repository, "c", 6)
    # The page ends exactly at the first message: nothing older.
    last = await history.page("c", before_seq=4, limit=3)
    assert (seqs(last), last.has_more) == ([1, 2, 3], False)
    # One message more than the page: older ones exist.
    assert (await history.page("c", before_seq=5, limit=3)).has_more is True
    # The whole channel in one page, with and without room to spare.
    whole = await history.page("c", limit=6)
    assert (seqs(whole), whole.has_more) == ([1, 2, 3, 4, 5, 6], False)
    almost = await history.page("c", limit=5)
    assert (seqs(almost), almost.has_more) == ([2, 3, 4, 5, 6], True)
    single = await history.page("c", before_seq=2, limit=1)
    assert (seqs(single), single.has_more) == ([1], False)


async def test_before_seq_in_the_middle_and_past_the_head(
    repository: Repository, history: HistoryReader
) -> None:
    await fill(repository, "c", 10)
    middle = await history.page("c", before_seq=6, limit=2)
    assert (seqs(middle), middle.has_more) == ([4, 5], True)
    # Past the head (or the largest uint64 a client can send): the newest page.
    for before in (11, 1000, MAX_SEQ, 2**64 - 1):
        page = await history.page("c", before_seq=before, limit=2)
        assert (seqs(page), page.has_more, page.last_seq) == ([9, 10], True, 10)


async def test_the_largest_page_is_the_limit(
    repository: Repository, history: HistoryReader
) -> None:
    await fill(repository, "c", MAX_HISTORY_LIMIT + 5)
    page = await history.page("c", limit=MAX_HISTORY_LIMIT)
    assert seqs(page) == list(range(6, MAX_HISTORY_LIMIT + 6))
    assert page.has_more is True


async def test_an_empty_channel_is_an_empty_page_at_its_head(
    repository: Repository, history: HistoryReader
) -> None:
    await repository.update_channel_settings(ChannelSettings("empty", 5))  # row, no messages
    page = await history.page("empty")
    assert page == MessagePage((), 0, False)
    assert await history.page("empty", thread_id="t") == MessagePage((), 0, False)


async def test_an_unknown_channel_is_an_empty_page_and_gets_no_row(
    repository: Repository, history: HistoryReader, engine: AsyncEngine
) -> None:
    await fill(repository, "known", 2)
    assert await channel_rows(engine) == 1
    for before in (0, 5):
        assert await history.page("nobody", before_seq=before) == MessagePage((), 0, False)
    assert await history.page("nobody", thread_id="t") == MessagePage((), 0, False)
    assert await channel_rows(engine) == 1


async def test_messages_carry_every_stored_field(
    repository: Repository, history: HistoryReader
) -> None:
    sent = msg("hello", user="u9", key="k9", username="nine", avatar_url="9.png", ts=1234)
    await append(repository, "c", sent)
    [m] = (await history.page("c")).messages
    assert (m.id, m.channel_id, m.seq, m.user_id, m.username, m.avatar_url) == (
        sent.id,
        "c",
        1,
        "u9",
        "nine",
        "9.png",
    )
    assert (m.content, m.thread_id, m.timestamp_ms, m.client_msg_id, m.reply_count) == (
        "hello",
        None,
        1234,
        "k9",
        0,
    )


# --- threads ----------------------------------------------------------------------------


async def test_the_channel_pages_hold_roots_and_replies_and_roots_count_their_replies(
    repository: Repository, history: HistoryReader
) -> None:
    root = msg("root")
    other_root = msg("other root")
    await append(repository, "c", root, other_root, msg("plain"))
    await append(
        repository,
        "c",
        msg("r1", thread_id=root.id),
        msg("x1", thread_id=other_root.id),
        msg("r2", thread_id=root.id),
        msg("r3", thread_id=root.id),
    )
    page = await history.page("c")
    assert [m.content for m in page.messages] == [
        "root",
        "other root",
        "plain",
        "r1",
        "x1",
        "r2",
        "r3",
    ]
    counts = {m.content: m.reply_count for m in page.messages}
    assert counts == {"root": 3, "other root": 1, "plain": 0, "r1": 0, "x1": 0, "r2": 0, "r3": 0}
    assert [m.thread_id for m in page.messages][3:] == [root.id, other_root.id, root.id, root.id]


async def test_a_root_counts_every_reply_even_those_outside_its_page(
    repository: Repository, history: HistoryReader
) -> None:
    root = msg("root")
    [root_seq] = await append(repository, "c", root)
    await append(repository, "c", *(msg(f"r{i}", thread_id=root.id) for i in range(4)))
    page = await history.page("c", before_seq=root_seq + 1, limit=1)
    assert [(m.content, m.reply_count) for m in page.messages] == [("root", 4)]


async def test_replies_to_a_root_from_another_channel_do_not_count(
    repository: Repository, history: HistoryReader
) -> None:
    root = msg("root")
    await append(repository, "c", root, msg("reply", thread_id=root.id))
    # Same thread id, other channel: not a reply of c's root.
    await append(repository, "d", *(msg("stray", thread_id=root.id) for _ in range(3)))
    page = await history.page("c")
    assert [(m.content, m.reply_count) for m in page.messages] == [("root", 1), ("reply", 0)]
    stray = await history.page("d", thread_id=root.id)
    assert [m.content for m in stray.messages] == ["stray"] * 3
    assert [m.reply_count for m in stray.messages] == [0, 0, 0]


async def test_pages_of_one_thread_hold_only_its_replies(
    repository: Repository, history: HistoryReader
) -> None:
    root = msg("root")
    other = msg("other")
    await append(repository, "c", root, other)
    # Replies interleaved with the rest of the channel.
    for i in range(1, 6):
        await append(
            repository,
            "c",
            msg(f"chat{i}"),
            msg(f"r{i}", thread_id=root.id),
            msg(f"o{i}", thread_id=other.id),
        )
    newest = await history.page("c", thread_id=root.id, limit=2)
    assert [m.content for m in newest.messages] == ["r4", "r5"]
    assert (newest.has_more, newest.last_seq) == (True, 17)
    assert all(m.thread_id == root.id for m in newest.messages)

    older = await history.page("c", thread_id=root.id, before_seq=newest.messages[0].seq, limit=2)
    assert ([m.content for m in older.messages], older.has_more) == (["r2", "r3"], True)
    first = await history.page("c", thread_id=root.id, before_seq=older.messages[0].seq, limit=2)
    assert ([m.content for m in first.messages], first.has_more) == (["r1"], False)

    # Exactly the whole thread, and a thread with no replies.
    whole = await history.page("c", thread_id=root.id, limit=5)
    assert ([m.content for m in whole.messages], whole.has_more) == (
        ["r1", "r2", "r3", "r4", "r5"],
        False,
    )
    assert await history.page("c", thread_id="no-such-root") == MessagePage((), 17, False)


async def test_a_reply_that_is_itself_replied_to_carries_its_count_in_the_thread_page(
    repository: Repository, history: HistoryReader
) -> None:
    root = msg("root")
    await append(repository, "c", root)
    reply = msg("reply", thread_id=root.id)
    await append(repository, "c", reply, msg("nested", thread_id=reply.id))
    page = await history.page("c", thread_id=root.id)
    assert [(m.content, m.reply_count) for m in page.messages] == [("reply", 1)]


# --- validation, errors, metrics ----------------------------------------------------------


@pytest.mark.parametrize(
    ("channel_id", "before_seq", "limit", "thread_id", "error"),
    [
        ("", 0, 10, "", "channel_id is required"),
        ("c\x00", 0, 10, "", "channel_id contains a NUL"),
        ("c", 0, 10, "t\x00", "thread_id contains a NUL"),
        ("c", 0, 0, "", "limit must be 1..100, got 0"),
        ("c", 0, MAX_HISTORY_LIMIT + 1, "", "limit must be 1..100, got 101"),
        ("c", 0, -1, "", "limit must be 1..100"),
        ("c", -1, 10, "", "before_seq out of range"),
    ],
)
async def test_malformed_requests_are_invalid_argument(
    repository: Repository,
    history: HistoryReader,
    metrics: StoreMetrics,
    channel_id: str,
    before_seq: int,
    limit: int,
    thread_id: str,
    error: str,
) -> None:
    await fill(repository, "c", 2)
    with pytest.raises(InvalidArgument, match=error):
        await history.page(channel_id, before_seq=before_seq, limit=limit, thread_id=thread_id)
    # Refused before any query ran.
    for name in ("history", "history_thread"):
        labels = {"query": name}
        assert metrics.registry.get_sample_value("waddle_store_query_seconds_count", labels) in (
            None,
            0.0,
        )


async def test_pages_are_timed_per_kind(
    repository: Repository, history: HistoryReader, metrics: StoreMetrics
) -> None:
    await fill(repository, "c", 3)
    await history.page("c")
    await history.page("c", before_seq=2)
    await history.page("c", thread_id="t")

    def count(name: str) -> float | None:
        return metrics.registry.get_sample_value(
            "waddle_store_query_seconds_count", {"query": name}
        )

    assert (count("history"), count("history_thread")) == (2.0, 1.0)


async def test_a_database_failure_is_unavailable_and_counted(
    repository: Repository, history: HistoryReader, metrics: StoreMetrics, migrated_url: str
) -> None:
    await fill(repository, "c", 3)
    exec_sql(migrated_url, "ALTER TABLE messages RENAME TO messages_gone")
    try:
        with pytest.raises(Unavailable, match=r"database unavailable \(history\)"):
            await history.page("c")
        with pytest.raises(Unavailable, match=r"database unavailable \(history_thread\)"):
            await history.page("c", thread_id="t")
    finally:
        exec_sql(migrated_url, "ALTER TABLE messages_gone RENAME TO messages")
    for name in ("history", "history_thread"):
        assert metrics.registry.get_sample_value("waddle_store_errors_total", {"op": name}) == 1
    assert seqs(await history.page("c")) == [1, 2, 3]
