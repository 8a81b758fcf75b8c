"""Process entry of the edge: bind, announce, drain on SIGTERM.

With ``WADDLE_EDGE_WORKERS`` above one, ``python -m edge`` becomes the
supervisor of that many worker processes (``edge.workers``); each worker
runs ``serve`` with ``shared_port`` set: it binds the shared port with
``SO_REUSEPORT`` and opens its own ops listener (``/healthz``, ``/readyz``,
``/metrics``), since a request to the shared port reaches any one worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web
from prometheus_client import Gauge

from edge import workers
from edge.app import create_app, healthz, metrics_view, readyz
from edge.handshake import EdgeRunner, PendingHandshakes
from edge.runtime import RUNTIME, SETTINGS, drain
from waddle_common import logs
from waddle_common.ops_http import bound_port
from waddle_common.settings import Settings

log = logging.getLogger("edge")


def pending_handshakes(app: web.Application) -> PendingHandshakes:
    """Connections not yet in a handler share the edge's connection cap with
    its WebSockets (see ``edge.handshake``)."""
    runtime = app[RUNTIME]
    refusals = runtime.metrics.refusals
    pending = PendingHandshakes(
        timeout=runtime.settings.handshake_timeout_seconds,
        max_connections=runtime.settings.edge_max_connections,
        established=lambda: runtime.sockets,
        loop=asyncio.get_running_loop(),
        on_close=lambda reason: refusals.labels(reason).inc(),
    )
    Gauge(
        "waddle_edge_pending_connections",
        "Connections waiting for a complete request (not yet in a handler)",
        registry=runtime.metrics.registry,
    ).set_function(pending.__len__)
    return pending


async def start_ops(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """A worker's private listener: the same health and metrics views as the
    shared port, answered by this worker only."""
    ops = web.Application()
    ops[SETTINGS] = app[SETTINGS]
    ops[RUNTIME] = app[RUNTIME]
    ops.router.add_get("/healthz", healthz)
    ops.router.add_get("/readyz", readyz)
    ops.router.add_get("/metrics", metrics_view)
    runner = web.AppRunner(ops, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, bound_port(site)


async def serve(settings: Settings, *, shared_port: bool = False) -> None:
    """Run one edge until SIGTERM; ``shared_port``: as one of ``edge.workers``."""
    app = create_app(settings)
    runner = EdgeRunner(
        app,
        handshakes=pending_handshakes,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_grace_seconds,
    )
    await runner.setup()
    ops: web.AppRunner | None = None
    ready: dict[str, int | str] = {"edge_id": settings.edge_id}
    if shared_port:
        ops, ready["ops_port"] = await start_ops(app, settings.edge_host, settings.edge_ops_port)
        ready["pid"] = os.getpid()
    site = web.TCPSite(
        runner,
        settings.edge_host,
        settings.edge_port,
        backlog=4096,
        reuse_port=shared_port,
    )
    await site.start()
    port = bound_port(site)
    logs.announce_ready("edge", http_port=port, **ready)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await drain(app[RUNTIME], settings.shutdown_grace_seconds)
    await runner.cleanup()
    if ops is not None:
        await ops.cleanup()
    log.info("stopped")


def _install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass


def main() -> None:
    settings = Settings()
    logs.setup("edge", settings.log_level)
    _install_uvloop()
    if settings.edge_workers > 1:
        raise SystemExit(asyncio.run(workers.supervise(settings)))
    asyncio.run(serve(settings))


def worker_main() -> None:
    """One of ``edge.workers``' processes (its settings come from the supervisor)."""
    settings = Settings()
    logs.setup("edge", settings.log_level)
    _install_uvloop()
    asyncio.run(serve(settings, shared_port=True))
