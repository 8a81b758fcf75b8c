"""When a channel gets its row: with its first message or its settings, never by a load or read.

Every test runs on SQLite and, when configured, PostgreSQL.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from store_service.db import create_engine
from store_service.models import ChannelRow
from store_service.repository import (
    AppendStatus,
    ChannelAppendResult,
    ChannelSettings,
    ChannelState,
    Repository,
)
from tests.store_service.helpers import after_heads_read, group, msg
from waddle_pb import store_pb2

if TYPE_CHECKING:
    from waddle_pb.store_pb2_grpc import StoreServiceAsyncStub

TIMEOUT = 10


async def channel_rows(engine: AsyncEngine) -> dict[str, tuple[int, int | None]]:
    """Every row of ``channels``: id -> (last_seq, max_connections)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(ChannelRow.id, ChannelRow.last_seq, ChannelRow.max_connections)
        )
        return {cid: (int(seq), limit) for cid, seq, limit in rows}


async def test_loading_100_channels_writes_no_rows(
    repository: Repository, engine: AsyncEngine
) -> None:
    ids = [f"joined-{i}" for i in range(100)]
    states = [await repository.load_channel(cid, 50) for cid in ids]
    assert states == [ChannelState(cid, 0, 0, ()) for cid in ids]
    # Every other reader of a channel without a row answers empty, too.
    for cid in ids[:10]:
        recent = await repository.recent_messages(cid, 10)
        after = await repository.messages_after(cid, after_seq=0)
        assert (recent.messages, recent.last_seq, recent.has_more) == ((), 0, False)
        assert (after.messages, after.last_seq, after.has_more) == ((), 0, False)
    assert await channel_rows(engine) == {}


async def test_loading_over_grpc_writes_no_rows(
    stub: StoreServiceAsyncStub, engine: AsyncEngine
) -> None:
    for i in range(100):
        state = await stub.LoadChannel(
            store_pb2.LoadChannelRequest(channel_id=f"joined-{i}", recent_limit=50),
            timeout=TIMEOUT,
        )
        assert (state.last_seq, len(state.recent), state.settings.max_connections) == (0, 0, 0)
    assert await channel_rows(engine) == {}


async def test_first_append_creates_exactly_that_channels_row_at_its_head(
    repository: Repository, engine: AsyncEngine
) -> None:
    for cid in ("quiet", "busy", "also-quiet"):
        await repository.load_channel(cid, 50)
    [result] = await repository.append_batch([group("busy", 0, msg("a"), msg("b"), msg("c"))])
    assert (result.status, result.last_seq) == (AppendStatus.OK, 3)
    assert [r.seq for r in result.results] == [1, 2, 3]
    assert await channel_rows(engine) == {"busy": (3, None)}
    state = await repository.load_channel("busy", 50)
    assert (state.last_seq, [m.content for m in state.recent]) == (3, ["a", "b", "c"])


async def test_a_channel_loaded_before_and_appended_later(
    repository: Repository, engine: AsyncEngine
) -> None:
    assert (await repository.load_channel("c", 50)).last_seq == 0
    # A stale owner's group and a pure fence check create nothing.
    [stale, probe] = await repository.append_batch([group("c", 4, msg("lost")), group("c", 0)])
    assert stale == ChannelAppendResult("c", AppendStatus.FENCED, 0)
    assert (probe.status, probe.last_seq) == (AppendStatus.OK, 0)
    assert await channel_rows(engine) == {}

    first = msg("first")
    [ok] = await repository.append_batch([group("c", 0, first)])
    assert (ok.status, ok.last_seq, [(r.id, r.seq) for r in ok.results]) == (
        AppendStatus.OK,
        1,
        [(first.id, 1)],
    )
    # The head is fenced from now on: an owner still believing in 0 is refused.
    [fenced] = await repository.append_batch([group("c", 0, msg("second owner"))])
    assert fenced == ChannelAppendResult("c", AppendStatus.FENCED, 1)
    [next_ok] = await repository.append_batch([group("c", 1, msg("second"))])
    assert (next_ok.status, next_ok.last_seq) == (AppendStatus.OK, 2)

    assert await channel_rows(engine) == {"c": (2, None)}
    page = await repository.messages_after("c", after_message_id=first.id)
    assert [(m.seq, m.content) for m in page.messages] == [(2, "second")]
    state = await repository.load_channel("c", 50)
    assert (state.last_seq, [m.content for m in state.recent]) == (2, ["first", "second"])


async def test_merged_requests_create_a_new_channel_once(
    repository: Repository, engine: AsyncEngine
) -> None:
    outcomes = await repository.append_many(
        [
            [group("n", 0, msg("one"))],
            [group("n", 1, msg("two")), group("m", 0)],
            [group("n", 0, msg("stale"))],
        ]
    )
    first, second, third = outcomes
    assert not isinstance(first, Exception) and first[0].last_seq == 1
    assert not isinstance(second, Exception) and second[0].last_seq == 2
    assert third == (ChannelAppendResult("n", AppendStatus.FENCED, 2),)
    assert await channel_rows(engine) == {"n": (2, None)}


async def test_settings_create_the_row_and_a_later_append_keeps_them(
    repository: Repository, engine: AsyncEngine
) -> None:
    await repository.load_channel("plain", 50)
    await repository.load_channel("capped", 50)
    await repository.update_channel_settings(ChannelSettings("capped", 7))
    assert await channel_rows(engine) == {"capped": (0, 7)}
    state = await repository.load_channel("capped", 50)
    assert (state.last_seq, state.max_connections, state.recent) == (0, 7, ())

    [stale] = await repository.append_batch([group("capped", 3, msg())])
    assert stale == ChannelAppendResult("capped", AppendStatus.FENCED, 0)
    [ok] = await repository.append_batch([group("capped", 0, msg("hi"))])
    assert (ok.status, ok.last_seq) == (AppendStatus.OK, 1)
    assert await channel_rows(engine) == {"capped": (1, 7)}


async def test_settings_over_grpc_create_the_row(
    stub: StoreServiceAsyncStub, engine: AsyncEngine
) -> None:
    await stub.LoadChannel(store_pb2.LoadChannelRequest(channel_id="g"), timeout=TIMEOUT)
    assert await channel_rows(engine) == {}
    await stub.UpdateChannelSettings(
        store_pb2.ChannelSettings(channel_id="g", max_connections=3), timeout=TIMEOUT
    )
    assert await channel_rows(engine) == {"g": (0, 3)}


async def test_a_row_created_since_the_heads_were_read_fences_its_groups(
    repository: Repository, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def row_appears(conn: AsyncConnection | None, _heads: dict[str, int]) -> None:
        # What a second writer committing "r" right after this read leaves.
        if conn is not None:
            await conn.execute(insert(ChannelRow).values(id="r", last_seq=4))
        else:
            async with engine.begin() as other:
                await other.execute(insert(ChannelRow).values(id="r", last_seq=4))

    after_heads_read(repository, monkeypatch, row_appears)
    [lost, kept] = await repository.append_batch(
        [group("r", 0, msg("lost")), group("s", 0, msg("kept"))]
    )
    assert lost == ChannelAppendResult("r", AppendStatus.FENCED, 4)
    assert (kept.status, kept.last_seq) == (AppendStatus.OK, 1)
    assert await channel_rows(engine) == {"r": (4, None), "s": (1, None)}
    assert (await repository.recent_messages("r")).messages == ()


async def test_two_stores_racing_to_create_a_channel_number_it_once(
    repository: Repository,
    engine: AsyncEngine,
    migrated_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite's write lock lets one writer in at a time: no race to set up")
    # Store A reads the head of a channel without a row, then waits while
    # store B creates the channel and commits; A then writes.
    other_engine = create_engine(migrated_url, pool_size=2)
    other = Repository(other_engine)
    read = asyncio.Event()
    go_on = asyncio.Event()

    async def pause_after_read(_conn: AsyncConnection | None, _heads: dict[str, int]) -> None:
        read.set()
        await go_on.wait()

    after_heads_read(repository, monkeypatch, pause_after_read)
    a = asyncio.create_task(repository.append_batch([group("race", 0, msg("from a"))]))
    try:
        await asyncio.wait_for(read.wait(), TIMEOUT)
        [b] = await asyncio.wait_for(
            other.append_batch([group("race", 0, msg("from b"), msg("b2"))]), TIMEOUT
        )
        go_on.set()
        [a_result] = await asyncio.wait_for(a, TIMEOUT)
    finally:
        go_on.set()
        if not a.done():
            a.cancel()
            await asyncio.gather(a, return_exceptions=True)
        await other.close()
        await other_engine.dispose()
    assert (b.status, b.last_seq) == (AppendStatus.OK, 2)
    assert a_result == ChannelAppendResult("race", AppendStatus.FENCED, 2)
    page = await repository.messages_after("race")
    assert [(m.seq, m.content) for m in page.messages] == [(1, "from b"), (2, "b2")]
