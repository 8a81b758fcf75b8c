"""The append path of each database: SQLite's SQLAlchemy statements, PostgreSQL's psycopg ones.

Every test runs on both databases (``db_url``); the PostgreSQL-only ones
check what is particular to ``pg_append``: no statement goes through
SQLAlchemy, and a connection the server dropped is replaced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service.batch_sql import MessageKey
from store_service.db import create_engine
from store_service.metrics import StoreMetrics
from store_service.models import ChannelRow, MessageRow
from store_service.repository import (
    AppendCommitter,
    AppendResult,
    AppendStatus,
    ChannelAppendResult,
    Repository,
    StoreError,
)
from tests.store_service.helpers import group, msg, pb_msg
from waddle_pb import store_pb2

if TYPE_CHECKING:
    from waddle_pb.store_pb2_grpc import StoreServiceAsyncStub

TIMEOUT = 10


@contextmanager
def sqlalchemy_statements(engine: AsyncEngine) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2])

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def stored(engine: AsyncEngine) -> list[tuple[str, int, str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(
                MessageRow.channel_id, MessageRow.seq, MessageRow.content, MessageRow.client_msg_id
            ).order_by(MessageRow.channel_id, MessageRow.seq)
        )
        return [(c, int(s), body, key) for c, s, body, key in rows]


async def heads(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(ChannelRow.id, ChannelRow.last_seq))
        return {cid: int(seq) for cid, seq in rows}


def ok(outcome: tuple[ChannelAppendResult, ...] | StoreError) -> tuple[ChannelAppendResult, ...]:
    assert not isinstance(outcome, StoreError), outcome
    return outcome


# --- fencing -------------------------------------------------------------------------


async def test_an_append_at_a_stale_head_is_fenced_and_writes_nothing(
    repository: Repository, engine: AsyncEngine
) -> None:
    [first] = await repository.append_batch([group("c", 0, msg("one"), msg("two"))])
    assert (first.status, first.last_seq) == (AppendStatus.OK, 2)
    [stale, fresh] = await repository.append_batch(
        [group("c", 1, msg("stale")), group("d", 0, msg("fresh"))]
    )
    assert stale == ChannelAppendResult("c", AppendStatus.FENCED, 2)
    assert (fresh.status, fresh.last_seq) == (AppendStatus.OK, 1)
    [ahead] = await repository.append_batch([group("c", 3, msg("ahead"))])
    assert ahead == ChannelAppendResult("c", AppendStatus.FENCED, 2)
    assert await heads(engine) == {"c": 2, "d": 1}
    assert [body for _, _, body, _ in await stored(engine)] == ["one", "two", "fresh"]


async def test_a_stale_group_of_duplicates_is_still_fenced(repository: Repository) -> None:
    await repository.append_batch([group("c", 0, msg(key="k")), group("c", 1, msg())])
    [again] = await repository.append_batch([group("c", 0, msg(key="k"))])
    assert again == ChannelAppendResult("c", AppendStatus.FENCED, 2)


# --- idempotency keys ---------------------------------------------------------------------


async def test_a_key_twice_in_one_batch_is_stored_once(
    repository: Repository, engine: AsyncEngine
) -> None:
    first = msg("first", key="k", ts=7)
    [result] = await repository.append_batch(
        [group("c", 0, first, msg("again", key="k"), msg("other", key="k2"))]
    )
    assert result.status is AppendStatus.OK
    assert result.results == (
        AppendResult(first.id, 1, 7),
        AppendResult(first.id, 1, 7, duplicate=True),
        AppendResult(result.results[2].id, 2, result.results[2].timestamp_ms),
    )
    assert result.last_seq == 2
    assert await stored(engine) == [("c", 1, "first", "k"), ("c", 2, "other", "k2")]


async def test_a_key_stored_by_an_earlier_batch_answers_with_the_original(
    repository: Repository, engine: AsyncEngine
) -> None:
    original = msg("first", key="k", ts=5)
    await repository.append_batch([group("c", 0, original)])
    [retry] = await repository.append_batch(
        [group("c", 1, msg("retried", key="k"), msg("new", key="n"))]
    )
    assert retry.results[0] == AppendResult(original.id, 1, 5, duplicate=True)
    assert (retry.results[1].seq, retry.results[1].duplicate, retry.last_seq) == (2, False, 2)
    # All duplicates: OK at the head, nothing moves.
    [only_dups] = await repository.append_batch([group("c", 2, msg(key="k"), msg(key="n"))])
    assert only_dups.status is AppendStatus.OK and only_dups.last_seq == 2
    assert [r.duplicate for r in only_dups.results] == [True, True]
    assert await stored(engine) == [("c", 1, "first", "k"), ("c", 2, "new", "n")]


async def test_the_same_key_in_two_merged_requests_is_stored_once(
    repository: Repository, engine: AsyncEngine
) -> None:
    first, second = await repository.append_many(
        [[group("c", 0, msg("a", key="k"))], [group("c", 1, msg("b", key="k"), msg("c"))]]
    )
    [a], [b] = ok(first), ok(second)
    assert (a.results[0].seq, b.results[0].seq, b.results[0].duplicate) == (1, 1, True)
    assert (b.results[1].seq, b.last_seq) == (2, 2)
    assert [body for _, _, body, _ in await stored(engine)] == ["a", "c"]


async def test_a_reused_message_id_fails_its_request_alone(
    repository: Repository, engine: AsyncEngine
) -> None:
    taken = msg("first", key="k")
    await repository.append_batch([group("c", 0, taken)])
    bad, good = await repository.append_many(
        [[group("c", 1, msg(id=taken.id, key="other"))], [group("c", 1, msg("fine"))]]
    )
    assert isinstance(bad, StoreError)
    assert ok(good)[0].last_seq == 2
    assert await heads(engine) == {"c": 2}


# --- over gRPC, through the committer -----------------------------------------------------


async def test_append_batch_over_grpc_fences_and_deduplicates(
    stub: StoreServiceAsyncStub,
) -> None:
    def request(expected: int, *messages: store_pb2.NewMessage) -> store_pb2.AppendBatchRequest:
        return store_pb2.AppendBatchRequest(
            channels=[
                store_pb2.ChannelAppend(
                    channel_id="g", expected_last_seq=expected, messages=messages
                )
            ]
        )

    original = pb_msg("one", key="k", ts=3)
    first = await stub.AppendBatch(request(0, original, pb_msg("two", key="k")), timeout=TIMEOUT)
    [result] = first.channels
    assert [(r.seq, r.duplicate) for r in result.results] == [(1, False), (1, True)]
    again = await stub.AppendBatch(request(1, pb_msg(key="k"), pb_msg("x")), timeout=TIMEOUT)
    [result] = again.channels
    assert (result.results[0].id, result.results[0].timestamp_ms) == (original.id, 3)
    assert [(r.seq, r.duplicate) for r in result.results] == [(1, True), (2, False)]
    fenced = await stub.AppendBatch(request(1, pb_msg("late")), timeout=TIMEOUT)
    [result] = fenced.channels
    assert (result.status, result.last_seq) == (store_pb2.ChannelAppendResult.FENCED, 2)


async def test_committed_appends_are_measured(engine: AsyncEngine) -> None:
    metrics = StoreMetrics()
    repository = Repository(engine, metrics)
    try:
        async with AppendCommitter(repository) as committer:
            await committer.append([group("c", 0, msg(), msg())])
            await committer.append([group("c", 2, msg())])
    finally:
        await repository.close()
    count = metrics.registry.get_sample_value("waddle_store_append_batch_size_count")
    total = metrics.registry.get_sample_value("waddle_store_append_batch_size_sum")
    assert (count, total) == (2, 3)
    assert metrics.registry.get_sample_value("waddle_store_append_seconds_count") == 2


# --- PostgreSQL: psycopg directly -------------------------------------------------------


def postgres_only(engine: AsyncEngine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("the psycopg append path is PostgreSQL's")


async def test_postgres_appends_send_nothing_through_sqlalchemy(
    repository: Repository, engine: AsyncEngine
) -> None:
    postgres_only(engine)
    with sqlalchemy_statements(engine) as seen:
        results = await repository.append_batch(
            [group(f"c{i}", 0, msg(key="k"), msg(key="k")) for i in range(50)]
        )
    assert seen == []
    assert {(r.status, r.last_seq) for r in results} == {(AppendStatus.OK, 1)}
    assert len(await stored(engine)) == 50


async def test_postgres_replaces_an_append_connection_the_server_dropped(
    repository: Repository, engine: AsyncEngine
) -> None:
    postgres_only(engine)
    await repository.append_batch([group("c", 0, msg("before"))])
    pg = repository._pg
    assert pg is not None and pg._conn is not None
    pid = pg._conn.info.backend_pid
    async with engine.connect() as conn:
        killed = await conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    assert killed
    [after] = await repository.append_batch([group("c", 1, msg("after"))])
    assert (after.status, after.last_seq) == (AppendStatus.OK, 2)
    assert pg._conn.info.backend_pid != pid


async def test_postgres_counts_every_appended_row(
    repository: Repository, engine: AsyncEngine
) -> None:
    # One statement writes heads, rows and authors: check all three landed.
    postgres_only(engine)
    await repository.append_batch(
        [group("a", 0, msg(user="u1", username="Ann")), group("b", 0, msg(user="u2"))]
    )
    assert await heads(engine) == {"a": 1, "b": 1}
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(MessageRow)) == 2
    assert (await repository.get_user("u1")).username == "Ann"


async def test_postgres_skips_the_read_for_heads_it_wrote_last(
    repository: Repository, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    postgres_only(engine)
    pg = repository._pg
    assert pg is not None
    reads: list[list[str]] = []
    real_read = pg.read

    async def counted_read(ids: Sequence[str], keys: Sequence[MessageKey]) -> Any:
        reads.append(list(ids))
        return await real_read(ids, keys)

    monkeypatch.setattr(pg, "read", counted_read)
    await repository.append_batch([group("c", 0, msg()), group("d", 0, msg())])
    assert reads == [["c", "d"]]
    for head in (1, 2, 3):
        [c, d] = await repository.append_batch([group("c", head, msg()), group("d", head, msg())])
        assert (c.last_seq, d.last_seq) == (head + 1, head + 1)
    assert reads == [["c", "d"]]
    assert await heads(engine) == {"c": 4, "d": 4}


async def test_postgres_a_head_another_store_moved_is_read_again(
    repository: Repository, engine: AsyncEngine, migrated_url: str
) -> None:
    postgres_only(engine)
    other_engine = create_engine(migrated_url, pool_size=1)
    other = Repository(other_engine)
    try:
        await repository.append_batch([group("c", 0, msg("ours"))])  # remembered: c at 1
        await other.append_batch([group("c", 1, msg("theirs", key="t"))])
        # At the real head, not the remembered one: accepted.
        [fresh] = await repository.append_batch([group("c", 2, msg("fresh"))])
        assert (fresh.status, fresh.last_seq) == (AppendStatus.OK, 3)
        await other.append_batch([group("c", 3, msg("theirs again"))])
        # At the remembered head: fenced by the real one, nothing written.
        [stale] = await repository.append_batch([group("c", 3, msg("stale"))])
        assert stale == ChannelAppendResult("c", AppendStatus.FENCED, 4)
    finally:
        await other.close()
        await other_engine.dispose()
    # A key the other store wrote is a duplicate here too.
    [dup] = await repository.append_batch([group("c", 4, msg(key="t"), msg("last"))])
    assert [(r.seq, r.duplicate) for r in dup.results] == [(2, True), (5, False)]
    assert [(s, body) for _, s, body, _ in await stored(engine)] == [
        (1, "ours"),
        (2, "theirs"),
        (3, "fresh"),
        (4, "theirs again"),
        (5, "last"),
    ]
