"""Alembic migrations, the start-up revision check, and the query plans they enable."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service.db import create_engine
from store_service.migrate import (
    NOT_MIGRATED,
    NotMigrated,
    check_at_head,
    current_revisions,
    head_revisions,
    upgrade,
    upgrade_async,
)
from store_service.repository import after_query, recent_query

ROOT = Path(__file__).resolve().parents[2]


def describe(connection: Connection) -> dict[str, Any]:
    insp = inspect(connection)
    return {
        "tables": set(insp.get_table_names()),
        "messages": {c["name"]: c for c in insp.get_columns("messages")},
        "channels": {c["name"]: c for c in insp.get_columns("channels")},
        "users": {c["name"]: c for c in insp.get_columns("users")},
        "unique": {tuple(u["column_names"]) for u in insp.get_unique_constraints("messages")},
        "fks": insp.get_foreign_keys("messages"),
    }


async def test_upgrade_from_empty_creates_the_schema_and_is_idempotent(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with pytest.raises(NotMigrated, match="run `make migrate`"):
            await check_at_head(engine)
        await upgrade_async(db_url)
        await upgrade_async(db_url)  # again: a no-op
        await check_at_head(engine)
        assert await current_revisions(engine) == head_revisions() == {"0001"}
        async with engine.connect() as conn:
            schema = await conn.run_sync(describe)
    finally:
        await engine.dispose()
    assert {"users", "channels", "messages", "alembic_version"} <= schema["tables"]
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
        assert "database at head (0001)" in done.stdout
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
