"""Process entry of the edge: bind, announce, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from prometheus_client import Gauge

from edge.app import create_app
from edge.handshake import EdgeRunner, PendingHandshakes
from edge.runtime import RUNTIME, drain
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


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    runner = EdgeRunner(
        app,
        handshakes=pending_handshakes,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_grace_seconds,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.edge_host, settings.edge_port, backlog=4096)
    await site.start()
    port = bound_port(site)
    logs.announce_ready("edge", http_port=port, edge_id=settings.edge_id)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await drain(app[RUNTIME], settings.shutdown_grace_seconds)
    await runner.cleanup()
    log.info("stopped")


def main() -> None:
    settings = Settings()
    logs.setup("edge", settings.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(serve(settings))
