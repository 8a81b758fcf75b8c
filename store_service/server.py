"""Process wiring for the store: database check, gRPC server, health, metrics, shutdown.

``serve()`` is what ``python -m store_service`` runs. ``start()`` is the same
start-up without signal handling, for tests that want a real server in
their own event loop.

Start-up refuses a database that is not at the Alembic head (the schema is
changed only by ``make migrate``, never implicitly by a booting replica).
Shutdown (SIGTERM/SIGINT): health goes NOT_SERVING so balancers drain us,
append streams end after answering what they are working on, in-flight
calls get ``shutdown_grace_seconds`` to finish, queued appends are
committed, then the engine is disposed and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
import grpc.aio
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import ProcessCollector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service.db import create_engine
from store_service.metrics import StoreMetrics
from store_service.migrate import NotMigrated, check_at_head
from store_service.repository import AppendCommitter, Repository
from store_service.servicer import StoreServicer
from waddle_common.grpc_tls import GrpcTls, bind
from waddle_common.grpc_util import ServerMetricsInterceptor, server_options
from waddle_common.logs import announce_ready
from waddle_common.ops_http import start_ops_server
from waddle_common.settings import Settings
from waddle_pb import store_pb2, store_pb2_grpc

log = logging.getLogger("store_service")

SERVICE_NAME = store_pb2.DESCRIPTOR.services_by_name["StoreService"].full_name


class StartupError(Exception):
    """The store cannot start; the message is the one line an operator needs."""


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@dataclass(eq=False)
class RunningStore:
    """A started store: its bound ports and the pieces ``stop`` takes down."""

    grpc_port: int
    metrics: StoreMetrics
    repository: Repository
    engine: AsyncEngine
    _server: grpc.aio.Server = field(repr=False)
    _health: health.aio.HealthServicer = field(repr=False)
    _committer: AppendCommitter = field(repr=False)
    _servicer: StoreServicer = field(repr=False)
    _ops: web.AppRunner | None = field(default=None, repr=False)
    metrics_port: int = 0
    serving: bool = True

    async def stop(self, grace: float) -> None:
        """Drain and stop (idempotent)."""
        if not self.serving:
            return
        self.serving = False
        await self._health.enter_graceful_shutdown()
        self._servicer.close_streams()
        await self._server.stop(grace)
        # Every call is finished or cancelled now; commit what is queued.
        await self._committer.close(timeout=max(grace, 1.0))
        if self._ops is not None:
            await self._ops.cleanup()
        await self.repository.close()
        await self.engine.dispose()


async def start(settings: Settings) -> RunningStore:
    """Check the database, then start gRPC (with health) and the metrics listener."""
    try:
        engine = create_engine(settings.database_url, pool_size=settings.db_pool_size)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot open database: {exc}") from exc
    try:
        await check_at_head(engine)
    except NotMigrated as exc:
        await engine.dispose()
        raise StartupError(str(exc)) from exc
    except (SQLAlchemyError, OSError) as exc:
        await engine.dispose()
        raise StartupError(f"database unreachable: {type(exc).__name__}: {exc}") from exc

    metrics = StoreMetrics()
    # The registry is per instance, so the default process metrics are
    # registered here explicitly.
    ProcessCollector(registry=metrics.registry)
    repository = Repository(engine, metrics)
    committer = AppendCommitter(repository)
    committer.start()

    timing = ServerMetricsInterceptor(metrics.registry)
    server = grpc.aio.server(interceptors=[timing], options=server_options())
    servicer = StoreServicer(repository, committer, observe=timing.observe)
    store_pb2_grpc.add_StoreServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        grpc_port = bind(
            server,
            _address(settings.store_host, settings.store_port),
            GrpcTls.from_settings(settings),
        )
    except (RuntimeError, ValueError) as exc:  # ValueError: unreadable TLS files
        grpc_port = 0
        bind_error: Exception | None = exc
    else:
        bind_error = None
    if not grpc_port:
        await committer.close()
        await repository.close()
        await engine.dispose()
        where = _address(settings.store_host, settings.store_port)
        raise StartupError(f"cannot listen on {where}: {bind_error or 'bind failed'}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    store = RunningStore(
        grpc_port=grpc_port,
        metrics=metrics,
        repository=repository,
        engine=engine,
        _server=server,
        _health=health_servicer,
        _committer=committer,
        _servicer=servicer,
    )
    try:
        store._ops, store.metrics_port = await start_ops_server(
            metrics.registry,
            settings.store_host,
            settings.store_metrics_port,
            healthy=lambda: store.serving,
        )
    except OSError as exc:
        await store.stop(0)
        raise StartupError(f"cannot listen for metrics: {exc}") from exc
    return store


async def serve(settings: Settings | None = None) -> int:
    """Run the store until SIGTERM/SIGINT; return the process exit code."""
    settings = settings if settings is not None else Settings()
    store = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    announce_ready("store", grpc_port=store.grpc_port, metrics_port=store.metrics_port)
    try:
        await stop.wait()
        log.info("stopping", extra={"grace_seconds": settings.shutdown_grace_seconds})
        await store.stop(settings.shutdown_grace_seconds)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
