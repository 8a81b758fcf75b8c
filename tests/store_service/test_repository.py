"""The repository and the group committer against a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service.metrics import StoreMetrics
from store_service.models import ChannelRow, MessageRow, UserRow
from store_service.repository import (
    MAX_PAGE,
    AppendCommitter,
    AppendResult,
    AppendStatus,
    ChannelSettings,
    Conflict,
    InvalidArgument,
    NotFound,
    Repository,
    Unavailable,
    User,
)
from tests.store_service.helpers import eventually, exec_sql, group, msg, write_lock


def sample(metrics: StoreMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def count_messages(engine: AsyncEngine, channel_id: str) -> int:
    async with engine.connect() as conn:
        stmt = select(MessageRow.id).where(MessageRow.channel_id == channel_id)
        return len((await conn.execute(stmt)).all())


# --- append: numbering, idempotency, fencing -------------------------------------------


async def test_append_numbers_new_messages_after_the_expected_head(
    repository: Repository,
) -> None:
    [first] = await repository.append_batch([group("c", 0, msg("a"), msg("b"), msg("c"))])
    assert first.status is AppendStatus.OK
    assert first.last_seq == 3
    assert [r.seq for r in first.results] == [1, 2, 3]
    assert not any(r.duplicate for r in first.results)

    [second] = await repository.append_batch([group("c", 3, msg("d"), msg("e"))])
    assert second.status is AppendStatus.OK
    assert [r.seq for r in second.results] == [4, 5]
    assert second.last_seq == 5

    page = await repository.recent_messages("c", 10)
    assert [m.content for m in page.messages] == ["a", "b", "c", "d", "e"]
    assert [m.seq for m in page.messages] == [1, 2, 3, 4, 5]
    assert page.last_seq == 5


async def test_append_keeps_fields_and_stamps_missing_timestamps(repository: Repository) -> None:
    stamped = msg("x", ts=1_700_000_000_123, thread_id="t1", key="k1")
    unstamped = msg("y")
    [result] = await repository.append_batch([group("c", 0, stamped, unstamped)])
    assert result.results[0].timestamp_ms == 1_700_000_000_123
    assert result.results[1].timestamp_ms > 1_700_000_000_123  # the store's clock: now
    [a, b] = (await repository.recent_messages("c")).messages
    assert (a.id, a.thread_id, a.client_msg_id, a.timestamp_ms) == (
        stamped.id,
        "t1",
        "k1",
        1_700_000_000_123,
    )
    assert (b.thread_id, b.client_msg_id, b.timestamp_ms) == (
        None,
        "",
        result.results[1].timestamp_ms,
    )


async def test_duplicate_key_in_the_same_group_returns_the_original(
    repository: Repository, engine: AsyncEngine
) -> None:
    original = msg("one", key="k", ts=111)
    retry = msg("one again", key="k", ts=222)
    other = msg("two", key="k2")
    [result] = await repository.append_batch([group("c", 0, original, retry, other)])
    assert result.status is AppendStatus.OK
    assert result.results == (
        AppendResult(original.id, 1, 111, False),
        AppendResult(original.id, 1, 111, True),
        AppendResult(other.id, 2, result.results[2].timestamp_ms, False),
    )
    assert result.last_seq == 2
    assert await count_messages(engine, "c") == 2


async def test_duplicate_key_in_a_later_batch_returns_the_original(
    repository: Repository, engine: AsyncEngine
) -> None:
    original = msg("one", key="k", ts=111)
    await repository.append_batch([group("c", 0, original)])

    retry = msg("one (retried with a new id)", key="k", ts=999)
    fresh = msg("two", key="k2", ts=333)
    [result] = await repository.append_batch([group("c", 1, retry, fresh)])
    assert result.status is AppendStatus.OK
    assert result.results == (
        AppendResult(original.id, 1, 111, True),
        AppendResult(fresh.id, 2, 333, False),
    )
    assert result.last_seq == 2
    assert await count_messages(engine, "c") == 2
    assert [m.content for m in (await repository.recent_messages("c")).messages] == ["one", "two"]


async def test_keys_are_per_user_and_per_channel(repository: Repository) -> None:
    [a, b] = await repository.append_batch(
        [
            group("c1", 0, msg(user="u1", key="k"), msg(user="u2", key="k")),
            group("c2", 0, msg(user="u1", key="k")),
        ]
    )
    assert [r.seq for r in a.results] == [1, 2]
    assert [r.duplicate for r in a.results + b.results] == [False, False, False]


async def test_keyless_messages_never_collide_but_a_resent_id_is_a_duplicate(
    repository: Repository,
) -> None:
    first, second = msg("a"), msg("b")
    [result] = await repository.append_batch([group("c", 0, first, second)])
    assert [r.seq for r in result.results] == [1, 2]
    [again] = await repository.append_batch([group("c", 2, first)])
    assert again.results == (AppendResult(first.id, 1, result.results[0].timestamp_ms, True),)
    assert again.last_seq == 2


async def test_stale_head_is_fenced_and_other_channels_still_commit(
    repository: Repository, engine: AsyncEngine
) -> None:
    await repository.append_batch([group("a", 0, msg("a1"), msg("a2"))])

    stale = msg("from a stale owner", key="stale")
    [fenced, ok] = await repository.append_batch([group("a", 1, stale), group("b", 0, msg("b1"))])
    assert fenced.status is AppendStatus.FENCED
    assert fenced.channel_id == "a"
    assert fenced.last_seq == 2
    assert fenced.results == ()
    assert ok.status is AppendStatus.OK
    assert ok.last_seq == 1
    assert await count_messages(engine, "a") == 2  # nothing of the fenced group
    assert await count_messages(engine, "b") == 1

    # The key was not consumed: the rightful owner can still write it.
    [later] = await repository.append_batch([group("a", 2, stale)])
    assert later.results == (AppendResult(stale.id, 3, later.results[0].timestamp_ms, False),)


async def test_a_group_of_only_duplicates_still_checks_the_fence(repository: Repository) -> None:
    original = msg(key="k")
    await repository.append_batch([group("c", 0, original, msg())])

    [fenced] = await repository.append_batch([group("c", 1, msg(key="k"))])
    assert fenced.status is AppendStatus.FENCED
    assert fenced.last_seq == 2

    [ok] = await repository.append_batch([group("c", 2, msg(key="k"))])
    assert ok.status is AppendStatus.OK
    assert ok.last_seq == 2
    assert ok.results[0].duplicate
    assert ok.results[0].id == original.id

    [probe] = await repository.append_batch([group("c", 2)])  # no messages: a pure fence check
    assert (probe.status, probe.last_seq) == (AppendStatus.OK, 2)


async def test_two_groups_for_one_channel_in_a_request_apply_in_order(
    repository: Repository,
) -> None:
    [first, second, third] = await repository.append_batch(
        [group("c", 0, msg()), group("c", 1, msg()), group("c", 1, msg())]
    )
    assert (first.status, first.last_seq) == (AppendStatus.OK, 1)
    assert (second.status, second.last_seq) == (AppendStatus.OK, 2)
    assert (third.status, third.last_seq) == (AppendStatus.FENCED, 2)


@pytest.mark.parametrize(
    "groups",
    [
        [group("", 0, msg())],
        [group("c", 0, msg(id=""))],
        [group("c", 0, msg(user=""))],
        [group("c", 0, msg("nul\x00"))],
        [group("c", 2**63 - 1, msg())],
        [group("c", 0, msg(id="same", key="k1"), msg(id="same", key="k2"))],
    ],
    ids=["no-channel", "no-id", "no-user", "nul", "seq-overflow", "id-reused"],
)
async def test_malformed_appends_are_invalid_and_write_nothing(
    repository: Repository, engine: AsyncEngine, groups: list[object]
) -> None:
    with pytest.raises(InvalidArgument):
        await repository.append_batch(groups)  # type: ignore[arg-type]
    async with engine.connect() as conn:
        assert (await conn.execute(select(ChannelRow.id))).all() == []


async def test_reused_message_id_conflicts_alone_in_a_merged_transaction(
    repository: Repository, engine: AsyncEngine
) -> None:
    taken = msg(key="k")
    await repository.append_batch([group("a", 0, taken)])

    reuse = msg(id=taken.id, key="another key")
    good = msg("fine")
    outcomes = await repository.append_many([[group("a", 1, reuse)], [group("b", 0, good)]])
    assert isinstance(outcomes[0], Conflict)
    assert not isinstance(outcomes[1], Exception)
    assert outcomes[1][0].results[0].id == good.id
    assert (await repository.recent_messages("a")).last_seq == 1  # the savepoint rolled back
    assert await count_messages(engine, "b") == 1

    with pytest.raises(Conflict):  # alone in its transaction
        await repository.append_batch([group("a", 1, reuse)])


async def test_database_error_fails_every_request_and_writes_nothing(
    repository: Repository, engine: AsyncEngine, metrics: StoreMetrics, migrated_url: str
) -> None:
    exec_sql(migrated_url, "ALTER TABLE users RENAME TO users_gone")
    try:
        outcomes = await repository.append_many(
            [[group("a", 0, msg())], [group("b", 0, msg(), msg())]]
        )
    finally:
        exec_sql(migrated_url, "ALTER TABLE users_gone RENAME TO users")
    assert [type(o) for o in outcomes] == [Unavailable, Unavailable]
    assert sample(metrics, "waddle_store_errors_total", op="append") == 1
    assert sample(metrics, "waddle_store_append_batch_size_count") == 0
    # The author upsert failed last, after channels and messages were
    # written: all of it rolled back.
    async with engine.connect() as conn:
        assert (await conn.execute(select(ChannelRow.id))).all() == []
        assert (await conn.execute(select(MessageRow.id))).all() == []


# --- authors ------------------------------------------------------------------------


async def test_authors_are_upserted_and_their_current_profile_is_served(
    repository: Repository,
) -> None:
    await repository.append_batch(
        [group("c", 0, msg("x", user="u1", username="alice", avatar_url="a.png"))]
    )
    assert await repository.get_user("u1") == User("u1", "alice", "a.png")

    await repository.append_batch(
        [group("c", 1, msg("y", user="u1", username="alice2", avatar_url="b.png"))]
    )
    assert await repository.get_user("u1") == User("u1", "alice2", "b.png")
    [x, y] = (await repository.recent_messages("c")).messages
    assert (x.username, x.avatar_url) == ("alice2", "b.png")  # the profile, not the snapshot
    assert (y.username, y.avatar_url) == ("alice2", "b.png")


async def test_unknown_author_falls_back_to_the_snapshot_username(
    repository: Repository, engine: AsyncEngine
) -> None:
    await repository.append_batch([group("c", 0, msg(user="u9", username="snap"))])
    async with engine.begin() as conn:
        await conn.execute(delete(UserRow))
    [m] = (await repository.recent_messages("c")).messages
    assert (m.username, m.avatar_url) == ("snap", "")


async def test_unchanged_authors_are_not_rewritten(
    repository: Repository, engine: AsyncEngine
) -> None:
    author = {"user": "u1", "username": "alice", "avatar_url": "a.png"}
    await repository.append_batch([group("c", 0, msg(**author))])  # type: ignore[arg-type]
    # Someone else changes the row behind the store's back...
    async with engine.begin() as conn:
        await conn.execute(update(UserRow).values(username="external"))
    # ...the same profile again is skipped by the cache, so it stays...
    await repository.append_batch([group("c", 1, msg(**author))])  # type: ignore[arg-type]
    assert (await repository.get_user("u1")).username == "external"
    # ...and a changed profile is written.
    await repository.append_batch([group("c", 2, msg(user="u1", username="alice", avatar_url="b"))])
    assert await repository.get_user("u1") == User("u1", "alice", "b")


# --- group commit across callers ---------------------------------------------------------


async def test_concurrent_callers_share_one_transaction_and_get_their_own_results(
    committer: AppendCommitter, metrics: StoreMetrics, repository: Repository
) -> None:
    a1, a2, b1 = msg("a1"), msg("a2"), msg("b1")
    # Both tasks queue before the committer runs: one transaction.
    first, second = await asyncio.wait_for(
        asyncio.gather(
            committer.append([group("c", 0, a1, a2)]),
            committer.append([group("c", 2, b1), group("d", 0, msg("d1"))]),
        ),
        timeout=30,
    )
    assert [(r.id, r.seq) for r in first[0].results] == [(a1.id, 1), (a2.id, 2)]
    assert [(r.id, r.seq) for r in second[0].results] == [(b1.id, 3)]
    assert (second[1].status, second[1].last_seq) == (AppendStatus.OK, 1)
    assert sample(metrics, "waddle_store_append_batch_size_count") == 1
    assert sample(metrics, "waddle_store_append_batch_size_sum") == 4
    assert (await repository.recent_messages("c")).last_seq == 3


async def test_callers_arriving_during_a_commit_share_the_next_one(
    committer: AppendCommitter,
    metrics: StoreMetrics,
    repository: Repository,
    migrated_url: str,
) -> None:
    await repository.update_channel_settings(ChannelSettings("c"))  # the row the lock is taken on
    async with write_lock(migrated_url, "c"):
        first = asyncio.create_task(committer.append([group("c", 0, msg("first"))]))
        await eventually(lambda: committer.in_flight == 1 and committer.queued == 0)
        second = asyncio.create_task(committer.append([group("c", 1, msg("second"))]))
        third = asyncio.create_task(committer.append([group("c", 1, msg("fenced"))]))
        await eventually(lambda: committer.queued == 2)
    one, two, three = await asyncio.wait_for(asyncio.gather(first, second, third), timeout=30)
    assert (one[0].status, one[0].last_seq) == (AppendStatus.OK, 1)
    assert (two[0].status, two[0].last_seq) == (AppendStatus.OK, 2)
    assert (three[0].status, three[0].last_seq) == (AppendStatus.FENCED, 2)
    assert sample(metrics, "waddle_store_append_batch_size_count") == 2
    assert sample(metrics, "waddle_store_append_batch_size_sum") == 3


async def test_a_malformed_request_fails_alone_without_queueing(committer: AppendCommitter) -> None:
    with pytest.raises(InvalidArgument):
        await committer.append([group("", 0, msg())])
    [ok] = await asyncio.wait_for(committer.append([group("c", 0, msg())]), timeout=30)
    assert ok.status is AppendStatus.OK


async def test_closed_committer_refuses_appends(repository: Repository) -> None:
    committer = AppendCommitter(repository)
    committer.start()
    await committer.close(timeout=10)
    with pytest.raises(Unavailable):
        await committer.append([group("c", 0, msg())])


# --- reads ---------------------------------------------------------------------------


async def fill(repository: Repository, channel_id: str, n: int) -> list[str]:
    messages = [msg(f"m{i}") for i in range(1, n + 1)]
    await repository.append_batch([group(channel_id, 0, *messages)])
    return [m.id for m in messages]


async def test_messages_after_seq_in_order_with_limit_and_has_more(
    repository: Repository,
) -> None:
    await fill(repository, "c", 7)
    page = await repository.messages_after("c", after_seq=2, limit=3)
    assert [m.seq for m in page.messages] == [3, 4, 5]
    assert page.has_more
    assert page.last_seq == 7
    page = await repository.messages_after("c", after_seq=5, limit=3)
    assert [m.seq for m in page.messages] == [6, 7]
    assert not page.has_more
    page = await repository.messages_after("c", after_seq=7)
    assert (page.messages, page.has_more, page.last_seq) == ((), False, 7)
    assert [m.seq for m in (await repository.messages_after("c")).messages] == list(range(1, 8))


async def test_messages_after_message_id(repository: Repository) -> None:
    ids = await fill(repository, "c", 5)
    page = await repository.messages_after("c", after_message_id=ids[1], limit=2)
    assert [m.id for m in page.messages] == ids[2:4]
    assert page.has_more


async def test_unknown_message_id_is_not_found(repository: Repository) -> None:
    other = await fill(repository, "other", 1)
    await fill(repository, "c", 2)
    for unknown in ("no-such-id", other[0]):  # absent, or in another channel
        with pytest.raises(NotFound, match=r"^Unknown message id$"):
            await repository.messages_after("c", after_message_id=unknown)
    with pytest.raises(NotFound):
        await repository.messages_after("never-created", after_message_id="x")


async def test_limits_are_capped(repository: Repository) -> None:
    await fill(repository, "c", MAX_PAGE + 5)
    for limit in (0, MAX_PAGE + 1, 1_000_000):
        page = await repository.messages_after("c", limit=limit)
        assert len(page.messages) == MAX_PAGE
        assert page.has_more
        recent = await repository.recent_messages("c", limit)
        assert len(recent.messages) == MAX_PAGE
        assert recent.messages[-1].seq == MAX_PAGE + 5
        assert recent.has_more


async def test_recent_messages_are_the_newest_oldest_first(repository: Repository) -> None:
    await fill(repository, "c", 6)
    page = await repository.recent_messages("c", 4)
    assert [m.seq for m in page.messages] == [3, 4, 5, 6]
    assert page.has_more
    assert page.last_seq == 6
    page = await repository.recent_messages("c", 6)
    assert [m.seq for m in page.messages] == [1, 2, 3, 4, 5, 6]
    assert not page.has_more


async def test_reads_of_a_missing_channel_are_empty_and_create_nothing(
    repository: Repository, engine: AsyncEngine
) -> None:
    assert (await repository.recent_messages("nope")).last_seq == 0
    page = await repository.messages_after("nope", after_seq=3)
    assert (page.messages, page.last_seq, page.has_more) == ((), 0, False)
    async with engine.connect() as conn:
        assert (await conn.execute(select(ChannelRow.id))).all() == []


async def test_reads_reject_empty_ids(repository: Repository) -> None:
    with pytest.raises(InvalidArgument):
        await repository.recent_messages("")
    with pytest.raises(InvalidArgument):
        await repository.messages_after("")
    with pytest.raises(InvalidArgument):
        await repository.messages_after("c", after_message_id="")
    with pytest.raises(InvalidArgument):
        await repository.load_channel("", 10)
    with pytest.raises(InvalidArgument):
        await repository.get_user("")


async def test_load_channel_returns_the_recent_state(
    repository: Repository, metrics: StoreMetrics
) -> None:
    state = await repository.load_channel("new", 50)
    assert (state.channel_id, state.last_seq, state.max_connections, state.recent) == (
        "new",
        0,
        0,
        (),
    )
    await fill(repository, "new", 5)
    await repository.update_channel_settings(ChannelSettings("new", 42))
    state = await repository.load_channel("new", 3)
    assert state.last_seq == 5
    assert state.max_connections == 42
    assert [m.seq for m in state.recent] == [3, 4, 5]
    assert (await repository.load_channel("new", 0)).recent == ()
    assert sample(metrics, "waddle_store_query_seconds_count", query="load_channel") == 3


# --- users and settings ------------------------------------------------------------------


async def test_users_upsert_and_get(repository: Repository) -> None:
    count = await repository.upsert_users(
        [User("u1", "a"), User("u2", "b", "b.png"), User("u1", "a2", "a.png")]
    )
    assert count == 2
    assert await repository.get_user("u1") == User("u1", "a2", "a.png")
    assert await repository.get_user("u2") == User("u2", "b", "b.png")
    with pytest.raises(NotFound):
        await repository.get_user("u3")
    with pytest.raises(InvalidArgument):
        await repository.upsert_users([User("", "x")])


async def test_update_channel_settings_creates_and_clears(
    repository: Repository, engine: AsyncEngine
) -> None:
    assert await repository.update_channel_settings(ChannelSettings("c", 10)) == ChannelSettings(
        "c", 10
    )
    assert (await repository.load_channel("c", 0)).max_connections == 10
    await repository.update_channel_settings(ChannelSettings("c", 0))
    async with engine.connect() as conn:
        stored = await conn.scalar(select(ChannelRow.max_connections).where(ChannelRow.id == "c"))
    assert stored is None  # 0 is "the default", stored as NULL
    assert (await repository.load_channel("c", 0)).max_connections == 0
    with pytest.raises(InvalidArgument):
        await repository.update_channel_settings(ChannelSettings("", 1))
    with pytest.raises(InvalidArgument):
        await repository.update_channel_settings(ChannelSettings("c", 2**31))


async def test_foreign_keys_are_enforced(engine: AsyncEngine) -> None:
    row = {
        "id": "m",
        "channel_id": "missing",
        "seq": 1,
        "user_id": "u",
        "username": "u",
        "content": "",
        "client_msg_id": "k",
        "created_at_ms": 0,
    }
    with pytest.raises(IntegrityError, match=r"(?i)foreign key"):
        async with engine.begin() as conn:
            await conn.execute(insert(MessageRow).values(**row))
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM messages"))).scalar() == 0
