"""Engine creation: SQLite PRAGMAs and folders, PostgreSQL pool, URL normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from store_service.db import create_engine, normalize_url
from tests.support.postgres import postgres_schema


async def test_sqlite_connections_get_wal_full_sync_fks_and_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "here.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}", busy_timeout_ms=1234)
    try:
        assert path.parent.is_dir()

        # Two connections open at once: the PRAGMAs are per connection.
        both = []
        async with engine.connect() as first, engine.connect() as second:
            for conn in (first, second):
                values = []
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout"):
                    values.append((await conn.exec_driver_sql(f"PRAGMA {name}")).scalar())
                both.append(tuple(values))
        assert engine.pool.checkedin() == 2  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
    assert both == [("wal", 2, 1, 1234), ("wal", 2, 1, 1234)]  # synchronous 2 = FULL


async def test_sqlite_savepoints_roll_back_inside_the_transaction(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO t VALUES (1)"))
            nested = await conn.begin_nested()
            await conn.execute(text("INSERT INTO t VALUES (2)"))
            await nested.rollback()
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT x FROM t"))).scalars().all() == [1]
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_postgres_pool_has_the_configured_size() -> None:
    async with postgres_schema() as url:
        engine = create_engine(url, pool_size=3)
        try:
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar() == 1
            assert engine.pool.size() == 3  # type: ignore[attr-defined]
            assert engine.dialect.driver == "psycopg"
        finally:
            await engine.dispose()


def test_urls_without_a_driver_get_the_async_one() -> None:
    assert normalize_url("sqlite:///x.db").drivername == "sqlite+aiosqlite"
    assert normalize_url("postgresql://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        create_engine("mysql+aiomysql://u@h/d")
