"""A tiny aiohttp listener for the gRPC services: ``/metrics`` and ``/healthz``.

The gRPC services report health over ``grpc.health.v1`` too; this HTTP side
exists so Prometheus can scrape them and so humans can curl them.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request], object]:
    async def handle(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle


async def start_ops_server(
    registry: CollectorRegistry, host: str, port: int, healthy: Callable[[], bool]
) -> tuple[web.AppRunner, int]:
    """Start the listener; return its runner and the port it bound (``port`` may be 0)."""

    async def healthz(_request: web.Request) -> web.Response:
        if healthy():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not serving\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry))  # type: ignore[arg-type]
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, bound_port(site)


def bound_port(site: web.TCPSite) -> int:
    """The port a started site listens on (the real one when asked for port 0)."""
    # asyncio's and uvloop's servers both have `sockets`; the ABC does not say so.
    sockets = getattr(site._server, "sockets", None)
    if not sockets:
        raise RuntimeError("site is not listening")
    return int(sockets[0].getsockname()[1])
