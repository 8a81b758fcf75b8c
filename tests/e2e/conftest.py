"""Fixtures for end-to-end tests: the real stack as processes, on SQLite and
(when ``WADDLE_TEST_POSTGRES_URL`` is set, or always under ``CI=true``)
on PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.support.postgres import postgres_schema
from tests.support.stack import Stack, start_stack

# These tests publish in bursts; the rate limits have their own tests.
GENEROUS_LIMITS = {
    "WADDLE_MESSAGE_RATE": "5000",
    "WADDLE_MESSAGE_BURST": "5000",
    "WADDLE_FRAME_RATE": "5000",
    "WADDLE_FRAME_BURST": "5000",
}
# Departures are announced at once here; tests/e2e/test_reads_presence.py
# runs the presence linger itself.
SHARED_STACK_ENV = {**GENEROUS_LIMITS, "WADDLE_PRESENCE_LINGER_SECONDS": "0"}


@contextlib.asynccontextmanager
async def database(kind: str) -> AsyncIterator[str | None]:
    if kind == "postgres":
        async with postgres_schema() as url:
            yield url
    else:
        yield None


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgres"])
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp(f"stack-{request.param}")
    async with (
        database(request.param) as url,
        start_stack(tmp, database_url=url, dev_mode=True, env=SHARED_STACK_ENV) as s,
    ):
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
