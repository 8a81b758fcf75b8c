"""Process entry of the edge: bind, announce, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from edge.app import RUNTIME, create_app, drain
from waddle_common import logs
from waddle_common.ops_http import bound_port
from waddle_common.settings import Settings

log = logging.getLogger("edge")


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=settings.shutdown_grace_seconds
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
