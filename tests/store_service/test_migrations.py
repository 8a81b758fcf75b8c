"""Alembic migrations, the start-up revision check, and the query plans they enable."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service.db import create_engine, writer
from store_service.history import history_query
from store_service.migrate import (
    NOT_MIGRATED,
    NotMigrated,
    alembic_config,
    check_at_head,
    current_revisions,
    head_revisions,
    upgrade,
    upgrade_async,
)
from store_service.models import Base
from store_service.repository import after_query, recent_query

THREAD_INDEX = "ix_messages_channel_id_thread_id_seq"

ROOT = Path(__file__).resolve().parents[2]


def describe(connection: Connection) -> dict[str, Any]:
    insp = inspect(connection)
    return {
        "tables": set(insp.get_table_names()),
        "messages": {c["name"]: c for c in insp.get_columns("messages")},
        "channels": {c["name"]: c for c in insp.get_columns("channels")},
        "users": {c["name"]: c for c in insp.get_columns("users")},
        "unique": {tuple(u["column_names"]) for u in insp.get_unique_constraints("messages")},
        "indexes": {i["name"]: tuple(i["column_names"]) for i in insp.get_indexes("messages")},
        "fks": insp.get_foreign_keys("messages"),
        "cursors": (
            {c["name"]: c for c in insp.get_columns("read_cursors")}
            if insp.has_table("read_cursors")
            else {}
        ),
        "cursors_pk": (
            insp.get_pk_constraint("read_cursors")["constrained_columns"]
            if insp.has_table("read_cursors")
            else []
        ),
    }


async def schema_of(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(describe)
    finally:
        await engine.dispose()


async def index_sql(engine: AsyncEngine, name: str) -> str:
    """The stored definition of index ``name`` (its CREATE INDEX statement)."""
    if engine.dialect.name == "postgresql":
        query = "SELECT indexdef FROM pg_indexes WHERE indexname = :name"
    else:
        query = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"
    async with engine.connect() as conn:
        return str(await conn.scalar(text(query), {"name": name}))


async def downgrade_async(url: str, revision: str) -> None:
    engine = create_engine(url, pool_size=1)
    config = alembic_config()

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    try:
        async with writer(engine).begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


async def test_upgrade_from_empty_creates_the_schema_and_is_idempotent(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with pytest.raises(NotMigrated, match="run `make migrate`"):
            await check_at_head(engine)
        await upgrade_async(db_url)
        await upgrade_async(db_url)  # again: a no-op
        await check_at_head(engine)
        assert await current_revisions(engine) == head_revisions() == {"0002"}
        async with engine.connect() as conn:
            schema = await conn.run_sync(describe)
    finally:
        await engine.dispose()
    assert {"users", "channels", "messages", "read_cursors", "alembic_version"} <= schema["tables"]
    assert set(schema["messages"]) == {
        "id",
        "channel_id",
        "seq",
        "user_id",
        "username",
        "content",
        "thread_id",
        "client_msg_id",
        "created_at_ms",
    }
    assert schema["messages"]["thread_id"]["nullable"]
    assert not schema["messages"]["client_msg_id"]["nullable"]
    assert schema["channels"]["max_connections"]["nullable"]
    assert set(schema["users"]) == {"id", "username", "avatar_url", "updated_at"}
    assert schema["unique"] == {("channel_id", "seq"), ("channel_id", "user_id", "client_msg_id")}
    assert [fk["referred_table"] for fk in schema["fks"]] == ["channels"]
    assert schema["indexes"][THREAD_INDEX] == ("channel_id", "thread_id", "seq")
    assert set(schema["cursors"]) == {"user_id", "channel_id", "seq"}
    assert not schema["cursors"]["seq"]["nullable"]
    assert schema["cursors_pk"] == ["user_id", "channel_id"]


async def test_the_thread_index_only_holds_messages_in_a_thread(engine: AsyncEngine) -> None:
    definition = " ".join(re.sub(r"[()]", " ", await index_sql(engine, THREAD_INDEX)).split())
    assert definition.endswith("WHERE thread_id IS NOT NULL"), definition


async def test_downgrade_to_0001_removes_history_and_cursors_and_upgrades_again(
    migrated_url: str,
) -> None:
    await downgrade_async(migrated_url, "0001")
    engine = create_engine(migrated_url)
    try:
        assert await current_revisions(engine) == {"0001"}
        with pytest.raises(NotMigrated):
            await check_at_head(engine)
    finally:
        await engine.dispose()
    schema = await schema_of(migrated_url)
    assert "read_cursors" not in schema["tables"]
    assert THREAD_INDEX not in schema["indexes"]
    assert {"users", "channels", "messages"} <= schema["tables"]

    await upgrade_async(migrated_url)
    schema = await schema_of(migrated_url)
    assert "read_cursors" in schema["tables"]
    assert THREAD_INDEX in schema["indexes"]


async def test_the_models_agree_with_the_migrations(engine: AsyncEngine) -> None:
    """What ``alembic revision --autogenerate`` would emit at head: nothing."""

    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))

    async with engine.connect() as conn:
        assert await conn.run_sync(differences) == []


async def test_a_database_at_an_unknown_revision_is_refused(migrated_url: str) -> None:
    engine = create_engine(migrated_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'ffffffff'"))
        with pytest.raises(NotMigrated) as caught:
            await check_at_head(engine)
    finally:
        await engine.dispose()
    assert str(caught.value).startswith(NOT_MIGRATED)
    assert "ffffffff" in str(caught.value)


def test_sync_upgrade_creates_the_sqlite_folder(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'deep' / 'er' / 'w.db'}"
    upgrade(url)
    upgrade(url)
    assert (tmp_path / "deep" / "er" / "w.db").is_file()


async def test_migrate_command_upgrades_the_configured_database(tmp_path: Path) -> None:
    db = tmp_path / "var" / "cli.db"
    env = {
        **os.environ,
        "WADDLE_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "PYTHONPATH": str(ROOT),
    }
    for _ in range(2):  # idempotent
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "store_service.migrate"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "database at head (0002)" in done.stdout
    engine = create_engine(f"sqlite+aiosqlite:///{db}")
    try:
        await check_at_head(engine)
    finally:
        await engine.dispose()


async def explain(engine: AsyncEngine, statement: Any) -> str:
    sql = str(statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # An empty table would be seq-scanned; ask what the index allows.
            await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            rows = (await conn.exec_driver_sql("EXPLAIN " + sql)).all()
            return "\n".join(str(r[0]) for r in rows)
        rows = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).all()
        return "\n".join(str(r[-1]) for r in rows)


async def test_recent_and_replay_queries_walk_the_channel_seq_index(engine: AsyncEngine) -> None:
    for statement in (after_query("c", 3, 10, 5), recent_query("c", 10, 5)):
        plan = await explain(engine, statement)
        if engine.dialect.name == "postgresql":
            assert "using uq_messages_channel_id_seq on messages" in plan, plan
        else:
            assert "SEARCH messages USING INDEX" in plan, plan
            assert "(channel_id=? AND seq" in plan, plan
            assert "TEMP B-TREE" not in plan, plan  # ordered by the index, no sort


async def test_history_pages_walk_the_seq_and_thread_indexes(engine: AsyncEngine) -> None:
    channel_page = await explain(engine, history_query("c", 10, 5))
    thread_page = await explain(engine, history_query("c", 10, 5, "root"))
    if engine.dialect.name == "postgresql":
        walks = {
            channel_page: "Index Scan Backward using uq_messages_channel_id_seq on messages",
            thread_page: f"Index Scan Backward using {THREAD_INDEX} on messages",
        }
        counts = f"Index Only Scan using {THREAD_INDEX} on messages reply"
        head = "using pk_channels on channels"
        sort = "Sort"
    else:
        walks = {
            channel_page: "SEARCH messages USING INDEX sqlite_autoindex_messages_2"
            " (channel_id=? AND seq<?)",
            thread_page: f"SEARCH messages USING INDEX {THREAD_INDEX}"
            " (channel_id=? AND thread_id=? AND seq<?)",
        }
        counts = f"SEARCH reply USING COVERING INDEX {THREAD_INDEX} (channel_id=? AND thread_id=?)"
        head = "SEARCH channels USING INDEX sqlite_autoindex_channels_1 (id=?)"
        sort = "TEMP B-TREE"
    for plan, walk in walks.items():
        assert walk in plan, plan  # the page, ordered by the index ...
        assert sort not in plan, plan  # ... so never sorted
        assert counts in plan, plan  # each row's reply count, from the thread index alone
        assert head in plan, plan
