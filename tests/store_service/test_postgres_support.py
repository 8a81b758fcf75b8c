"""tests.support.postgres: skip-or-fail policy and the per-test schema helper."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from store_service.db import create_engine
from tests.support import postgres
from tests.support.postgres import (
    ENV_VAR,
    base_url,
    postgres_schema,
    postgres_schema_sync,
    schema_url,
    skip_or_fail,
)


def test_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="why"):
        skip_or_fail("why")


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_fails_in_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="why"):
        skip_or_fail("why")


def test_unset_url_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        base_url()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        base_url()


async def test_unreachable_server_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "postgresql://postgres@127.0.0.1:1/test")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="unreachable"):
        async with postgres_schema():
            pass
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="unreachable"), postgres_schema_sync():
        pass


def test_schema_url_sets_the_search_path() -> None:
    url = schema_url("postgresql+psycopg://u:p@h:5/db?sslmode=disable", "s1")
    parsed = make_url(url)
    assert parsed.query == {"sslmode": "disable", "options": "-csearch_path=s1"}
    assert parsed.password == "p"


def test_base_url_gets_the_psycopg_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "postgresql://postgres@127.0.0.1:5432/test")
    assert base_url().startswith("postgresql+psycopg://")


def schema_exists(url: str, schema: str) -> bool:
    conninfo = make_url(url).set(drivername="postgresql", query={})
    with psycopg.connect(conninfo.render_as_string(hide_password=False)) as conn:
        row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    return row is not None


@pytest.mark.postgres
async def test_schema_is_fresh_used_and_dropped() -> None:
    async with postgres_schema(prefix="waddle_probe") as url:
        schema = str(make_url(url).query["options"]).removeprefix("-csearch_path=")
        assert isinstance(schema, str) and schema.startswith("waddle_probe_")
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                assert (await conn.execute(text("SELECT current_schema()"))).scalar() == schema
                await conn.execute(text("CREATE TABLE probe (x int)"))
            async with engine.connect() as conn:
                where = await conn.scalar(
                    text(
                        "SELECT table_schema FROM information_schema.tables"
                        " WHERE table_name = 'probe'"
                    )
                )
                assert where == schema
        finally:
            await engine.dispose()
        assert schema_exists(url, schema)
    assert not schema_exists(url, schema)


@pytest.mark.postgres
def test_sync_helper_drops_its_schema() -> None:
    with postgres_schema_sync() as url:
        schema = str(make_url(url).query["options"]).removeprefix("-csearch_path=")
        assert schema_exists(url, schema)
    assert not schema_exists(url, schema)


def test_module_documents_its_api() -> None:
    doc = postgres.__doc__ or ""
    for name in ("skip_or_fail", "base_url", "schema_url", "postgres_schema", "postgres_url"):
        assert name in doc
