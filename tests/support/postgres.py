"""PostgreSQL for tests: a fresh, uniquely named schema per test, dropped afterwards.

Point ``WADDLE_TEST_POSTGRES_URL`` at a server the tests may create schemas
in, e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/test``. Without it
(or when the server cannot be reached) PostgreSQL tests are skipped -
unless ``CI=true``, where silently skipping would hide a broken pipeline,
so they fail instead.

API
---
``ENV_VAR``
    ``"WADDLE_TEST_POSTGRES_URL"``.
``skip_or_fail(reason: str) -> NoReturn``
    ``pytest.skip(reason)``, or ``pytest.fail(reason)`` when ``CI`` is true.
``base_url() -> str``
    The configured URL (any ``postgresql[+driver]://`` form, normalised to
    ``postgresql+psycopg://``); calls ``skip_or_fail`` when unset.
``schema_url(url: str, schema: str) -> str``
    ``url`` with ``options=-csearch_path=<schema>`` added, so every
    connection made from it (SQLAlchemy + psycopg 3, Alembic, or a service
    started with ``WADDLE_DATABASE_URL`` set to it) works inside ``schema``.
``postgres_schema(url: str | None = None, *, prefix: str = "waddle_test")``
    Async context manager: checks the server is reachable (``skip_or_fail``
    if not), creates ``<prefix>_<random>``, yields its ``schema_url`` and
    drops the schema with CASCADE on exit. The schema is empty: run
    ``store_service.migrate.upgrade_async(url)`` to get the store's tables.
``postgres_schema_sync(...)``
    The same as a plain (synchronous) context manager.
``postgres_url``
    A pytest fixture (async, function scope) yielding a fresh schema URL via
    ``postgres_schema()``. Import it into a ``conftest.py`` or test module
    (``from tests.support.postgres import postgres_url``) to use it.
``discover(host="127.0.0.1", port=5432) -> str | None``
    The URL of a server on ``host:port`` the tests can use (user
    ``postgres`` or the current user, database ``test`` or ``postgres``,
    with the right to create schemas), or None. ``python -m
    tests.support.postgres --discover`` prints it: ``make test`` sets
    ``WADDLE_TEST_POSTGRES_URL`` from it when that is not set already.

Loaded as a pytest plugin (``pytest -p tests.support.postgres``, as ``make
test`` does), it ends the run with a loud note of how many PostgreSQL tests
were skipped and how to run them.

Example::

    async def test_something(postgres_url: str) -> None:
        await upgrade_async(postgres_url)
        ...
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import NoReturn

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from sqlalchemy.engine import make_url

ENV_VAR = "WADDLE_TEST_POSTGRES_URL"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5432
CONNECT_TIMEOUT_S = 5
# Dropping waits for locks held by connections a test leaked; bound it.
DROP_LOCK_TIMEOUT = "10s"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip a PostgreSQL test that cannot run - but fail it in CI, where it must run."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)", pytrace=False)
    pytest.skip(reason)


def base_url() -> str:
    """The configured server URL, as ``postgresql+psycopg://...``."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        skip_or_fail(f"{ENV_VAR} is not set")
    url = make_url(raw)
    if url.get_backend_name() != "postgresql":
        pytest.fail(f"{ENV_VAR} is not a PostgreSQL URL: {url.drivername}", pytrace=False)
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def schema_url(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` as their search_path."""
    parsed = make_url(url)
    query = dict(parsed.query)
    query["options"] = f"-csearch_path={schema}"
    return parsed.set(query=query).render_as_string(hide_password=False)


def _libpq_conninfo(url: str) -> str:
    # psycopg wants a libpq URL: no "+driver", and no SQLAlchemy-only bits.
    parsed = make_url(url).set(drivername="postgresql")
    query = {k: v for k, v in parsed.query.items() if k != "options"}
    return parsed.set(query=query).render_as_string(hide_password=False)


def _connect(url: str) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(
            _libpq_conninfo(url), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
        )
    except psycopg.OperationalError as exc:
        skip_or_fail(f"PostgreSQL at {ENV_VAR} is unreachable: {exc}".strip())


def _create_schema(url: str, prefix: str) -> str:
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _connect(url) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return schema


def _drop_schema(url: str, schema: str) -> None:
    with _connect(url) as conn:
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(DROP_LOCK_TIMEOUT)))
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextmanager
def postgres_schema_sync(url: str | None = None, *, prefix: str = "waddle_test") -> Iterator[str]:
    """Synchronous ``postgres_schema``."""
    server = url or base_url()
    schema = _create_schema(server, prefix)
    try:
        yield schema_url(server, schema)
    finally:
        _drop_schema(server, schema)


@asynccontextmanager
async def postgres_schema(
    url: str | None = None, *, prefix: str = "waddle_test"
) -> AsyncIterator[str]:
    """Create a fresh schema, yield a URL that works inside it, drop it afterwards."""
    server = url or base_url()
    # psycopg's sync API in a thread: a few statements, and it keeps one
    # code path for the sync and async helpers.
    schema = await asyncio.to_thread(_create_schema, server, prefix)
    try:
        yield schema_url(server, schema)
    finally:
        await asyncio.to_thread(_drop_schema, server, schema)


@pytest_asyncio.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, empty schema on the test server (skipped, or failed in CI, without one)."""
    async with postgres_schema() as url:
        yield url


def discover(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str | None:
    """A URL of a usable server on ``host:port`` (see the module's docstring), or None."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return None
    for user in dict.fromkeys(["postgres", getpass.getuser()]):
        for database in ("test", "postgres"):
            url = f"postgresql+psycopg://{user}@{host}:{port}/{database}"
            try:
                with psycopg.connect(
                    _libpq_conninfo(url), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                ) as conn:
                    row = conn.execute(
                        "SELECT has_database_privilege(current_database(), 'CREATE')"
                    ).fetchone()
            except psycopg.Error:
                continue
            if row is not None and row[0] is True:
                return url
    return None


def skipped_for_postgres(reports: list[pytest.TestReport]) -> list[str]:
    """Node IDs of the tests skipped because no PostgreSQL server was configured or reachable."""
    found: dict[str, None] = {}
    for report in reports:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if ENV_VAR in reason:
            found[report.nodeid] = None
    return list(found)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = skipped_for_postgres(terminalreporter.stats.get("skipped", []))
    if not skipped:
        return
    terminalreporter.section("PostgreSQL tests skipped", sep="!", yellow=True, bold=True)
    for line in (
        f"SKIPPED {len(skipped)} PostgreSQL tests: no server at {ENV_VAR}.",
        f"To run them, start PostgreSQL on {DEFAULT_HOST}:{DEFAULT_PORT} (user postgres;",
        "PGPASSWORD if it needs one) and `make test` finds it, or set",
        f"  {ENV_VAR}=postgresql+psycopg://USER[:PASSWORD]@HOST:5432/DB",
        "to a database the tests may create (and drop) schemas in.",
    ):
        terminalreporter.write_line(line, yellow=True, bold=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--discover",
        action="store_true",
        help=f"print the URL of a usable server on {DEFAULT_HOST}:{DEFAULT_PORT}, if any",
    )
    args = parser.parse_args(argv)
    if args.discover:
        url = discover()
        if url:
            print(url)
        return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
