"""An in-process server whose WebSocket upgrades the edge takes over
(``edge.upgraded``), for tests of the socket layer on real TCP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from edge import upgraded
from edge.handshake import EdgeRunner, PendingHandshakes
from waddle_common.ops_http import bound_port


def upgrade_route(
    session: upgraded.SessionFactory,
    *,
    max_size: int = 1 << 16,
    on_open: Callable[[upgraded.EdgeSocket], None] = lambda sock: None,
) -> Callable[[web.Request], object]:
    """A handler: plain requests get ``ok``; upgrades become ``EdgeSocket``s."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="ok\n")
        chosen = await upgraded.checked(request, ())
        sock, tail = upgraded.take_over(request, chosen, max_size=max_size, session=session)
        on_open(sock)
        sock.feed(tail)
        return upgraded.taken_over()

    return handler


@contextlib.asynccontextmanager
async def serve(
    handler: Callable[[web.Request], object], *, cap: int = 4, timeout: float = 60
) -> AsyncIterator[tuple[int, PendingHandshakes, list[str]]]:
    """Serve ``handler`` at ``/`` on a free port; yield the port, the pending
    handshakes and the reasons pending connections were closed for."""
    app = web.Application()
    app.router.add_get("/", handler)  # type: ignore[arg-type]
    reasons: list[str] = []
    made: list[PendingHandshakes] = []

    def handshakes(_app: web.Application) -> PendingHandshakes:
        made.append(
            PendingHandshakes(
                timeout=timeout,
                max_connections=cap,
                established=lambda: 0,
                loop=asyncio.get_running_loop(),
                on_close=reasons.append,
            )
        )
        return made[0]

    runner = EdgeRunner(app, handshakes=handshakes, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield bound_port(site), made[0], reasons
    finally:
        await runner.cleanup()


class Ignore:
    """A session that takes every message and notices nothing."""

    def on_text(self, text: str) -> bool:
        return True

    def on_binary(self) -> bool:
        return True

    def on_closed(self, code: int | None) -> None:
        return None
