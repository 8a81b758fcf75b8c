"""Fixtures: every store test runs on SQLite (a temp file) and, when configured, PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc
import grpc.aio
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service.db import create_engine
from store_service.metrics import StoreMetrics
from store_service.migrate import upgrade_async
from store_service.repository import AppendCommitter, Repository
from store_service.server import RunningStore, start
from tests.support.postgres import postgres_schema
from waddle_common.grpc_util import channel_options
from waddle_common.settings import Settings
from waddle_pb import store_pb2_grpc

if TYPE_CHECKING:
    from waddle_pb.store_pb2_grpc import StoreServiceAsyncStub


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a SQLite file in a not-yet-existing folder, or a fresh PG schema."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'var' / 'waddle.db'}"
    else:
        async with postgres_schema() as url:
            yield url


@pytest.fixture
async def migrated_url(db_url: str) -> str:
    await upgrade_async(db_url)
    return db_url


@pytest.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(migrated_url, pool_size=5)
    yield eng
    await eng.dispose()


@pytest.fixture
def metrics() -> StoreMetrics:
    return StoreMetrics()


@pytest.fixture
async def repository(engine: AsyncEngine, metrics: StoreMetrics) -> AsyncIterator[Repository]:
    repository = Repository(engine, metrics)
    yield repository
    await repository.close()


@pytest.fixture
async def committer(repository: Repository) -> AsyncIterator[AppendCommitter]:
    async with AppendCommitter(repository) as running:
        yield running


def store_settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        store_host="127.0.0.1",
        store_port=0,
        store_metrics_port=0,
        shutdown_grace_seconds=2.0,
    )


@pytest.fixture
async def store(migrated_url: str) -> AsyncIterator[RunningStore]:
    running = await start(store_settings(migrated_url))
    yield running
    await running.stop(2.0)


@pytest.fixture
async def grpc_channel(store: RunningStore) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{store.grpc_port}", options=channel_options())
    yield channel
    await channel.close()


@pytest.fixture
def stub(grpc_channel: grpc.aio.Channel) -> StoreServiceAsyncStub:
    # grpc is untyped, so the stub's overload for aio channels cannot be picked.
    return cast("StoreServiceAsyncStub", store_pb2_grpc.StoreServiceStub(grpc_channel))
