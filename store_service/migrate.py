"""Schema migrations: ``python -m store_service.migrate`` (what ``make migrate`` runs).

Upgrades the database at ``WADDLE_DATABASE_URL`` to the newest Alembic
revision; running it again is a no-op. ``check_at_head`` is what the server
calls at start-up to refuse a database that is behind (or ahead of) the
code.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service import db
from waddle_common.settings import Settings

PACKAGE_DIR = Path(__file__).resolve().parent

NOT_MIGRATED = "database not migrated: run `make migrate`"


class NotMigrated(Exception):
    """The database's schema revision is not the code's head revision."""


def alembic_config() -> Config:
    """The store's Alembic configuration (scripts in ``store_service/migrations``)."""
    config = Config(str(PACKAGE_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(PACKAGE_DIR / "migrations"))
    return config


def head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


async def upgrade_async(url: str) -> None:
    """Upgrade the database at ``url`` to head, in one transaction."""
    engine = db.create_engine(url, pool_size=1)
    config = alembic_config()

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    try:
        async with db.writer(engine).begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


def upgrade(url: str) -> None:
    """Synchronous ``upgrade_async`` (for scripts and sync test fixtures).

    Inside a running event loop, ``await upgrade_async(url)`` instead.
    """
    asyncio.run(upgrade_async(url))


async def current_revisions(engine: AsyncEngine) -> set[str]:
    def read(connection: Connection) -> set[str]:
        return set(MigrationContext.configure(connection).get_current_heads())

    async with engine.connect() as connection:
        return await connection.run_sync(read)


async def check_at_head(engine: AsyncEngine) -> None:
    """Raise ``NotMigrated`` unless the database is exactly at the head revision."""
    current = await current_revisions(engine)
    heads = head_revisions()
    if current != heads:
        have = ",".join(sorted(current)) or "empty"
        want = ",".join(sorted(heads))
        raise NotMigrated(f"{NOT_MIGRATED} (database at {have}, code needs {want})")


def main() -> None:
    url = Settings().database_url
    try:
        upgrade(url)
    except Exception as exc:
        sys.exit(f"migration failed: {type(exc).__name__}: {exc}")
    print(f"database at head ({','.join(sorted(head_revisions()))})")


if __name__ == "__main__":
    main()
