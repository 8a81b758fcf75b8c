"""Engine creation: one place that knows how Waddle talks to SQLite and PostgreSQL.

SQLite (the embedded default) gets WAL, ``synchronous=FULL`` (an
acknowledged message must survive power loss), foreign keys and a busy
timeout on every connection, and SQLAlchemy takes over BEGIN from the
sqlite3 driver so that SAVEPOINTs and transactional DDL work and so that
write transactions can start with ``BEGIN IMMEDIATE``. The SQLite library
must be 3.35 or newer (the group commit uses ``UPDATE ... FROM`` and
``RETURNING``). PostgreSQL goes through psycopg 3 with a bounded pool.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

# Execution option marking a write transaction (see ``writer``).
WRITE_OPTION = "waddle_write"

DEFAULT_BUSY_TIMEOUT_MS = 5000
DEFAULT_CONNECT_TIMEOUT_S = 5
MIN_SQLITE_VERSION = (3, 35, 0)


def normalize_url(url: str | URL) -> URL:
    """Pick the async driver Waddle ships with when the URL names none."""
    parsed = make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return parsed.set(drivername="sqlite+aiosqlite")
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        return parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def create_engine(
    url: str | URL,
    *,
    pool_size: int = 10,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
) -> AsyncEngine:
    """Create the service's engine for ``url`` (SQLite or PostgreSQL).

    Use ``writer(engine)`` for transactions that write: on SQLite they take
    the write lock up front, which avoids the deadlock-prone upgrade of a
    read lock (SQLITE_BUSY_SNAPSHOT is not retried by the busy timeout).
    """
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _create_sqlite_engine(parsed, busy_timeout_ms)
    if backend == "postgresql":
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT_S
        return create_async_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=30,
            # A database restart leaves dead sockets in the pool; the ping
            # turns them into a fresh connection instead of a failed append.
            pool_pre_ping=True,
            connect_args=connect_args,
        )
    raise ValueError(f"unsupported database URL scheme: {parsed.drivername}")


def check_sqlite_version(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    """Refuse a SQLite library the store's statements cannot run on (``ValueError``)."""
    if version < MIN_SQLITE_VERSION:
        found = ".".join(map(str, version))
        wanted = ".".join(map(str, MIN_SQLITE_VERSION))
        raise ValueError(f"SQLite {wanted} or newer is required, this Python has {found}")


def _create_sqlite_engine(url: URL, busy_timeout_ms: int) -> AsyncEngine:
    # Fail at start-up, not with a syntax error on the first append.
    check_sqlite_version()
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: the driver stops issuing its own BEGINs; the
    # "begin" hook below issues them instead.
    engine = create_async_engine(url, connect_args={"isolation_level": None})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def writer(engine: AsyncEngine) -> AsyncEngine:
    """The same engine (and pool), marked so its transactions begin as writes."""
    return engine.execution_options(**{WRITE_OPTION: True})
