"""Small builders and waits shared by the store tests."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from store_service.batch_sql import MessageKey, StoredRef
from store_service.repository import ChannelAppend, NewMessage, Repository
from waddle_pb import store_pb2


def new_id() -> str:
    return uuid.uuid4().hex


def msg(
    content: str = "hi",
    *,
    user: str = "u1",
    key: str = "",
    username: str | None = None,
    avatar_url: str = "",
    ts: int = 0,
    thread_id: str | None = None,
    id: str | None = None,
) -> NewMessage:
    return NewMessage(
        id=id if id is not None else new_id(),
        user_id=user,
        username=username if username is not None else f"name-{user}",
        avatar_url=avatar_url,
        content=content,
        client_msg_id=key,
        timestamp_ms=ts,
        thread_id=thread_id,
    )


def group(channel_id: str, expected: int, *messages: NewMessage) -> ChannelAppend:
    return ChannelAppend(channel_id, expected, tuple(messages))


def pb_msg(
    content: str = "hi", *, user: str = "u1", key: str = "", ts: int = 0, id: str | None = None
) -> store_pb2.NewMessage:
    return store_pb2.NewMessage(
        id=id if id is not None else new_id(),
        user_id=user,
        username=f"name-{user}",
        content=content,
        client_msg_id=key,
        timestamp_ms=ts,
    )


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@asynccontextmanager
async def write_lock(url: str, channel_id: str) -> AsyncIterator[None]:
    """Hold the database's write lock (SQLite) or ``channel_id``'s row lock (PostgreSQL).

    The channel row must exist. Whatever the store tries to commit touching
    it waits until the block exits.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database
        lite = sqlite3.connect(parsed.database, isolation_level=None)
        try:
            lite.execute("BEGIN IMMEDIATE")
            yield
            lite.execute("ROLLBACK")
        finally:
            lite.close()
        return
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    async with await psycopg.AsyncConnection.connect(conninfo) as pg:
        await pg.execute("SELECT 1 FROM channels WHERE id = %s FOR UPDATE", (channel_id,))
        yield
        await pg.rollback()


def exec_sql(url: str, statement: str) -> None:
    """Run one statement on its own connection, outside the code under test."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database
        lite = sqlite3.connect(parsed.database, isolation_level=None)
        try:
            lite.execute(statement)
        finally:
            lite.close()
        return
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as pg:
        pg.execute(statement.encode())


HeadsHook = Callable[[AsyncConnection | None, dict[str, int]], Awaitable[None]]


def after_heads_read(
    repository: Repository, monkeypatch: pytest.MonkeyPatch, hook: HeadsHook
) -> None:
    """Run ``hook(conn, heads)`` in every append right after it read (and locked) the heads.

    ``conn`` is the append's own SQLAlchemy connection (SQLite: it holds the
    write lock, so anything written meanwhile goes through it), or None on
    PostgreSQL, whose appends run on psycopg directly (``pg_append``): there,
    write through another connection. ``hook`` may change ``heads``.
    """
    pg = repository._pg
    if pg is not None:
        real_read = pg.read

        async def read(
            ids: Sequence[str], keys: Sequence[MessageKey]
        ) -> tuple[dict[str, int], dict[MessageKey, StoredRef]]:
            heads, stored = await real_read(ids, keys)
            await hook(None, heads)
            return heads, stored

        monkeypatch.setattr(pg, "read", read)
        return
    real_lock = repository._sql.lock_heads

    async def lock_heads(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, int]:
        found = await real_lock(conn, ids)
        await hook(conn, found)
        return found

    monkeypatch.setattr(repository._sql, "lock_heads", lock_heads)
