"""Alembic environment for the store: migrations run through the async engine.

``store_service.migrate`` hands over an open connection in
``config.attributes["connection"]`` (one transaction, so a failed upgrade
leaves nothing behind). Run by the ``alembic`` CLI instead, this builds the
engine from ``WADDLE_DATABASE_URL`` with ``store_service.db.create_engine``
so SQLite gets the same PRAGMAs as the service.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from store_service import db
from store_service.models import Base
from waddle_common.settings import Settings

# Any constant works; it only has to be the same for every migrator.
_MIGRATION_LOCK_KEY = 0x57414444  # "WADD"


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Two replicas starting at once would otherwise race to create the
        # same tables; the loser waits, then finds the schema at head.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        # store_service.db issues BEGIN itself on SQLite, so DDL is
        # transactional there too: a failed upgrade leaves nothing behind.
        transactional_ddl=True,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_new_engine(url: str) -> None:
    engine = db.create_engine(url, pool_size=1)
    try:
        async with db.writer(engine).begin() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


def _offline() -> None:
    url = context.config.attributes.get("database_url") or Settings().database_url
    context.configure(
        url=str(db.normalize_url(url)),
        target_metadata=Base.metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.attributes.get("database_url") or Settings().database_url
    asyncio.run(_run_with_new_engine(url))


if context.is_offline_mode():
    _offline()
else:
    _online()
