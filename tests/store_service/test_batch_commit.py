"""Set-based group commit: many channel groups in a few statements (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service.db import check_sqlite_version
from store_service.models import ChannelRow, MessageRow
from store_service.repository import (
    AppendResult,
    AppendStatus,
    ChannelAppend,
    ChannelAppendResult,
    Conflict,
    Repository,
    StoreError,
)
from tests.store_service.helpers import after_heads_read, group, msg


@contextmanager
def counted_statements(engine: AsyncEngine, repository: Repository) -> Iterator[list[str]]:
    """Every statement sent to the database (an executemany counts once) while
    the block runs: through SQLAlchemy, and on PostgreSQL's own append path
    (``store_service.pg_append``, counted after the block)."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2])  # (conn, cursor, statement, parameters, context, executemany)

    pg = repository._pg
    before = pg.statements if pg is not None else 0
    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
        if pg is not None:
            seen.extend(["(psycopg append path)"] * (pg.statements - before))


async def heads(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(ChannelRow.id, ChannelRow.last_seq))
        return {cid: int(seq) for cid, seq in rows}


async def message_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(MessageRow)) or 0)


def ok(outcome: tuple[ChannelAppendResult, ...] | StoreError) -> tuple[ChannelAppendResult, ...]:
    assert not isinstance(outcome, StoreError), outcome
    return outcome


# --- a large mixed batch ---------------------------------------------------------------


async def test_500_groups_commit_with_fencing_numbering_and_duplicates(
    repository: Repository, engine: AsyncEngine
) -> None:
    existing = 400
    seeded = [
        group(f"c{i}", 0, msg(user=f"u{i % 13}", key="a"), msg(user=f"u{i % 13}", key="b"))
        for i in range(existing)
    ]
    seed_results = await repository.append_batch(seeded)
    originals = {
        (f"c{i}", key): r
        for i, result in enumerate(seed_results)
        for key, r in zip(("a", "b"), result.results, strict=True)
    }

    groups: list[ChannelAppend] = []
    for i in range(existing):
        cid, user = f"c{i}", f"u{i % 13}"
        kind = i % 4
        if kind == 0:  # a stale owner: fenced, nothing written
            groups.append(group(cid, 1, msg(user=user, key="x")))
        elif kind == 1:  # a retry of stored messages only
            groups.append(group(cid, 2, msg(user=user, key="a"), msg(user=user, key="b")))
        elif kind == 2:  # new messages
            groups.append(group(cid, 2, msg(user=user, key="n1"), msg(user=user, key="n2")))
        else:  # stored duplicate, new, in-batch duplicate, keyless new
            groups.append(
                group(
                    cid,
                    2,
                    msg(user=user, key="b"),
                    msg(user=user, key="n1", ts=42),
                    msg(user=user, key="n1", ts=43),
                    msg(user=user),
                )
            )
    for i in range(100):  # channels never seen before
        groups.append(group(f"new{i}", 0, msg(user=f"w{i}", username=f"writer {i}", key="k")))
    assert len(groups) == 500

    results = await repository.append_batch(groups)
    assert [r.channel_id for r in results] == [g.channel_id for g in groups]
    for i, (sent, result) in enumerate(zip(groups, results, strict=True)):
        cid = sent.channel_id
        if i >= existing:
            assert (result.status, result.last_seq) == (AppendStatus.OK, 1)
            assert result.results == (
                AppendResult(sent.messages[0].id, 1, result.results[0].timestamp_ms),
            )
            continue
        kind = i % 4
        if kind == 0:
            assert result == ChannelAppendResult(cid, AppendStatus.FENCED, 2)
        elif kind == 1:
            assert (result.status, result.last_seq) == (AppendStatus.OK, 2)
            assert result.results == (
                replace_duplicate(originals[(cid, "a")]),
                replace_duplicate(originals[(cid, "b")]),
            )
        elif kind == 2:
            assert (result.status, result.last_seq) == (AppendStatus.OK, 4)
            assert [(r.id, r.seq, r.duplicate) for r in result.results] == [
                (sent.messages[0].id, 3, False),
                (sent.messages[1].id, 4, False),
            ]
        else:
            assert (result.status, result.last_seq) == (AppendStatus.OK, 4)
            dup_b, new, in_batch, keyless = result.results
            assert dup_b == replace_duplicate(originals[(cid, "b")])
            assert new == AppendResult(sent.messages[1].id, 3, 42)
            assert in_batch == AppendResult(sent.messages[1].id, 3, 42, duplicate=True)
            assert (keyless.id, keyless.seq, keyless.duplicate) == (sent.messages[3].id, 4, False)

    stored_heads = await heads(engine)
    for i in range(existing):
        assert stored_heads[f"c{i}"] == (2 if i % 4 in (0, 1) else 4), i
    assert all(stored_heads[f"new{i}"] == 1 for i in range(100))
    # Seeded 800, plus 2 new in each of 100 "new" and 100 "mixed" groups, plus 100 new channels.
    assert await message_count(engine) == 800 + 200 + 200 + 100

    # Every channel's history is gapless, in the order the results reported.
    page = await repository.recent_messages("c3")
    assert [(m.seq, m.id) for m in page.messages] == [
        (1, originals[("c3", "a")].id),
        (2, originals[("c3", "b")].id),
        (3, groups[3].messages[1].id),
        (4, groups[3].messages[3].id),
    ]
    assert (await repository.get_user("w7")).username == "writer 7"

    # A fenced group consumed nothing: its key is still free for the owner.
    [later] = await repository.append_batch([group("c0", 2, msg(user="u0", key="x"))])
    assert (later.status, later.last_seq, later.results[0].duplicate) == (
        AppendStatus.OK,
        3,
        False,
    )


def replace_duplicate(original: AppendResult) -> AppendResult:
    return AppendResult(original.id, original.seq, original.timestamp_ms, duplicate=True)


# --- statement counts ---------------------------------------------------------------------


def mixed_batch(tag: str, n: int) -> tuple[list[ChannelAppend], list[ChannelAppend]]:
    """A seeding batch and a follow-up of ``n`` channels with every kind of outcome.

    The follow-up holds, per channel: a stored duplicate, a new message, an
    in-batch duplicate and a new author profile; then a second group for the
    same channel that is fenced; and a group for a channel never seen.
    """
    seed = [group(f"{tag}{i}", 0, msg(user=f"{tag}u{i}", key="old")) for i in range(n)]
    follow: list[ChannelAppend] = []
    for i in range(n):
        cid, user = f"{tag}{i}", f"{tag}u{i}"
        follow.append(
            group(
                cid,
                1,
                msg(user=user, key="old"),
                msg(user=user, key="new", username=f"renamed {i}"),
                msg(user=user, key="new"),
            )
        )
        follow.append(group(cid, 1, msg(user=user, key="late")))
        follow.append(group(f"{tag}fresh{i}", 0, msg(user=user, username=f"renamed {i}")))
    return seed, follow


async def statements_for(
    repository: Repository, engine: AsyncEngine, tag: str, n: int
) -> list[str]:
    seed, follow = mixed_batch(tag, n)
    await repository.append_batch(seed)
    with counted_statements(engine, repository) as seen:
        results = await repository.append_batch(follow)
    statuses = [r.status for r in results]
    assert statuses == [AppendStatus.OK, AppendStatus.FENCED, AppendStatus.OK] * n
    assert [r.last_seq for r in results[:3]] == [2, 2, 1]
    return seen


async def test_statement_count_does_not_grow_with_the_number_of_groups(
    repository: Repository, engine: AsyncEngine
) -> None:
    few = await statements_for(repository, engine, "few", 5)  # 15 groups
    many = await statements_for(repository, engine, "many", 200)  # 600 groups
    assert many, "the commit's statements were not counted"
    assert len(few) == len(many)
    # BEGIN (SQLite), create channels, read/lock heads, look up keys, move
    # heads, insert messages, upsert authors.
    assert len(many) <= 7, many
    assert (await repository.get_user("manyu199")).username == "renamed 199"


async def test_merged_requests_share_one_set_of_statements(
    repository: Repository, engine: AsyncEngine
) -> None:
    async def count(tag: str, requests: int) -> int:
        batch: list[Sequence[ChannelAppend]] = [
            [
                group(f"{tag}{i}", 0, msg(user=tag, key="k"), msg(user=tag, key="k")),
                group(f"{tag}x{i}", 0, msg(user=tag)),
            ]
            for i in range(requests)
        ]
        with counted_statements(engine, repository) as seen:
            outcomes = await repository.append_many(batch)
        for outcome in outcomes:
            [first, second] = ok(outcome)
            assert [r.seq for r in first.results] == [1, 1]
            assert second.last_seq == 1
        return len(seen)

    assert await count("two", 2) == await count("forty", 40)


async def test_a_batch_beyond_the_sqlite_parameter_limit_commits(
    repository: Repository, engine: AsyncEngine
) -> None:
    # 22,000 keys and 11,000 head moves of 3 values each: on SQLite the key
    # lookup takes three statements and the compare-and-set two (at most
    # 32766 parameters each); PostgreSQL passes arrays, one statement each.
    n = 11_000
    seed = [group(f"c{i}", 0, msg(key="k")) for i in range(n)]
    await repository.append_batch(seed)
    retry = [group(f"c{i}", 1, msg(key="k"), msg(key="new")) for i in range(n)]
    with counted_statements(engine, repository) as seen:
        results = await repository.append_batch(retry)
    assert all((r.status, r.last_seq) == (AppendStatus.OK, 2) for r in results)
    assert all(r.results[0].duplicate and not r.results[1].duplicate for r in results)
    assert [r.results[0].id for r in results[:3]] == [g.messages[0].id for g in seed[:3]]
    assert len(seen) <= 9, seen
    assert set((await heads(engine)).values()) == {2}
    assert await message_count(engine) == 2 * n


# --- merged requests and the per-request fallback -------------------------------------------


async def test_merged_requests_see_each_other_in_order(repository: Repository) -> None:
    original = msg("one", key="k", ts=5)
    outcomes = await repository.append_many(
        [
            [group("c", 0, original)],
            [group("c", 1, msg("retry", key="k"), msg("two"))],  # duplicate of the request before
            [group("c", 1, msg("stale"))],  # fenced by the request before
            [group("c", 2), group("d", 0, msg())],
        ]
    )
    first, second, third, fourth = (ok(o) for o in outcomes)
    assert first[0].results == (AppendResult(original.id, 1, 5),)
    assert second[0].results[0] == AppendResult(original.id, 1, 5, duplicate=True)
    assert (second[0].last_seq, second[0].results[1].seq) == (2, 2)
    assert third[0] == ChannelAppendResult("c", AppendStatus.FENCED, 2)
    assert (fourth[0].status, fourth[0].last_seq, fourth[1].last_seq) == (AppendStatus.OK, 2, 1)


async def test_a_conflicting_request_fails_alone_and_moves_no_head(
    repository: Repository, engine: AsyncEngine
) -> None:
    taken = msg("first", key="k")
    outcomes = await repository.append_many(
        [
            [group("c", 0, taken)],
            # Would move c to 3, but reuses a message id: rolled back alone.
            [group("c", 1, msg("fine"), msg(id=taken.id, key="another key"))],
            # So this one is checked against the head the first request left.
            [group("c", 1, msg("after", key="k2")), group("d", 0, msg())],
        ]
    )
    assert isinstance(outcomes[1], Conflict)
    first, third = ok(outcomes[0]), ok(outcomes[2])
    assert (first[0].status, first[0].last_seq) == (AppendStatus.OK, 1)
    assert [(r.seq, r.duplicate) for r in third[0].results] == [(2, False)]
    assert (third[1].status, third[1].last_seq) == (AppendStatus.OK, 1)
    assert await heads(engine) == {"c": 2, "d": 1}
    assert await message_count(engine) == 3


async def test_a_head_that_moved_despite_the_lock_fences_its_groups(
    repository: Repository, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    await repository.append_batch([group("a", 0, msg(), msg())])

    async def stale_heads(_conn: Any, found: dict[str, int]) -> None:
        if "a" in found:
            found["a"] = 0  # what a second writer ignoring the lock would leave us believing

    after_heads_read(repository, monkeypatch, stale_heads)
    [fenced, also_fenced, other] = await repository.append_batch(
        [group("a", 0, msg("lost")), group("a", 1, msg("lost too")), group("b", 0, msg("kept"))]
    )
    assert fenced == ChannelAppendResult("a", AppendStatus.FENCED, 2)
    assert also_fenced == ChannelAppendResult("a", AppendStatus.FENCED, 2)
    assert (other.status, other.last_seq) == (AppendStatus.OK, 1)
    assert await heads(engine) == {"a": 2, "b": 1}
    assert [m.content for m in (await repository.recent_messages("b")).messages] == ["kept"]
    assert await message_count(engine) == 3


def test_an_old_sqlite_library_is_refused() -> None:
    with pytest.raises(ValueError, match=r"SQLite 3\.35\.0 or newer is required"):
        check_sqlite_version((3, 34, 1))
    check_sqlite_version((3, 35, 0))
