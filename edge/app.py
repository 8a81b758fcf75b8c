"""The edge's HTTP surface: the WebSocket endpoints (v1, one channel per
socket, and v1.1, many), the chat page, health, metrics and (in
development mode only) a token minting route.

Shared resources live on the application (``edge.runtime``). A WebSocket's
handler admits it, joins (v1) and upgrades it; from then on the socket is
the edge's (``edge.upgraded``) and its session (``ChannelSocket`` here,
``edge.mux.MuxSocket`` for v1.1) handles its frames as they arrive and
unregisters it when it ends: no coroutine stays behind per socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge import frames, joining, mux, protocol, upgraded
from edge.auth import (
    DEV_CLAIM,
    SUBPROTOCOL,
    AuthError,
    Identity,
    dev_user_id,
    dev_username,
    extract_token,
    mint_token,
)
from edge.connection import Connection, State
from edge.heartbeat import HEARTBEAT, Heartbeat, heartbeat_ctx
from edge.limits import ConnectionBudget
from edge.runtime import RUNTIME, SETTINGS, EdgeRuntime, drain, refuse, runtime_ctx
from edge.shards import ShardRouter
from edge.upgraded import EdgeSocket
from waddle_common.settings import Settings

__all__ = ["RUNTIME", "SETTINGS", "create_app", "drain"]

log = logging.getLogger("edge")

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self'; "
    "script-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"
)


async def _admit(request: web.Request, channel_id: str | None) -> Identity | web.Response:
    """The checks both endpoints make before the upgrade: the identity, or the refusal."""
    runtime = request.app[RUNTIME]
    settings = runtime.settings
    if runtime.draining:
        return refuse(runtime, 503, "Server restarting", "draining", retry=True)
    if not origin_allowed(request, settings.allowed_origins):
        return refuse(runtime, 403, "Origin not allowed", "origin")
    if runtime.sockets >= settings.edge_max_connections:
        return refuse(runtime, 503, "Edge at capacity", "edge_full", retry=True)
    token = extract_token(request.headers)
    if token is None:
        return refuse(runtime, 401, "Unauthorized", "unauthorized")
    try:
        identity = await runtime.verifier.verify(token)
    except AuthError as exc:
        log.info("token refused", extra={"reason": str(exc), "channel_id": channel_id})
        return refuse(runtime, 401, "Unauthorized", "unauthorized")
    if channel_id is not None and not identity.may_join(channel_id):
        return refuse(runtime, 403, "Forbidden", "forbidden")
    if runtime.local.per_user.get(identity.user_id, 0) >= settings.user_max_edge_connections:
        return refuse(runtime, 429, "Too many connections", "user_edge_limit", retry=True)
    return identity


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """v1: one channel per socket, joined before the upgrade."""
    runtime = request.app[RUNTIME]
    settings = runtime.settings
    channel_id = request.match_info["channel_id"]
    if not protocol.valid_channel_id(channel_id):
        return refuse(runtime, 400, "Invalid channel id", "bad_channel")
    admitted = await _admit(request, channel_id)
    if isinstance(admitted, web.Response):
        return admitted
    identity = admitted
    subprotocol = await upgraded.checked(request, (SUBPROTOCOL,))
    conn = Connection(
        id=next(runtime.conn_ids),
        channel_id=channel_id,
        identity=identity,
        joined_at_ms=time.time_ns() // 1_000_000,
    )
    link = runtime.router
    outcome = await joining.join(runtime, conn, link, resume=False)
    if isinstance(outcome, str):
        if outcome == "channel_full":
            return refuse(runtime, 503, "Channel full", "channel_full", retry=True)
        if outcome == "user_limit":
            return refuse(runtime, 429, "Too many connections", "user_limit", retry=True)
        return refuse(runtime, 503, "Channel unavailable", "unavailable", retry=True)
    conn.cursor = conn.floor = outcome.last_seq
    initial_state = outcome.initial_state
    heartbeat = request.app[HEARTBEAT]
    try:
        sock, tail = upgraded.take_over(
            request,
            subprotocol,
            max_size=settings.max_frame_bytes,
            session=lambda sock: ChannelSocket(runtime, conn, link, heartbeat, sock),
        )
    except BaseException:
        link.leave(conn)
        runtime.local.remove(conn)
        raise
    conn.ws = sock
    conn.transport = sock.transport
    heartbeat.add(sock)
    runtime.sockets += 1
    runtime.metrics.connects.inc()
    log.info(
        "connected",
        extra={"channel_id": channel_id, "user_id": identity.user_id, "conn_id": conn.id},
    )
    runtime.expiry.watch(conn)
    conn.send(initial_state, runtime.metrics, runtime.local.limits, "initial_state")
    runtime.local.activate(conn)
    sock.feed(tail)
    return upgraded.taken_over()


@dataclass(eq=False, slots=True)
class ChannelSocket:
    """A v1 socket's session: its frames go to its one channel."""

    runtime: EdgeRuntime
    conn: Connection
    link: ShardRouter
    heartbeat: Heartbeat
    sock: EdgeSocket
    # Made on the first frame: a silent connection costs none.
    budget: ConnectionBudget | None = None

    def _budget(self) -> ConnectionBudget:
        if self.budget is None:
            self.budget = frames.first_budget(self.runtime)
        return self.budget

    def on_text(self, text: str) -> bool:
        conn, runtime = self.conn, self.runtime
        if conn.state is State.CLOSED:
            return False
        budget = self._budget()
        try:
            frame = protocol.parse_client_frame(
                text, max_message_length=runtime.settings.max_message_length
            )
        except protocol.ProtocolError as exc:
            runtime.metrics.frames_in.labels("invalid").inc()
            return frames.refuse_frame(runtime, conn, budget, exc.frame(conn.channel_id))
        refused = frames.take_frame(runtime, conn, budget, frame, conn.channel_id)
        if refused is not None:
            return refused
        return frames.channel_frame(runtime, conn, self.link, budget, frame)

    def on_binary(self) -> bool:
        if self.conn.state is State.CLOSED:
            return False
        return frames.refuse_binary(self.runtime, self.conn, self._budget())

    def on_closed(self, code: int | None) -> None:
        runtime, conn = self.runtime, self.conn
        runtime.sockets -= 1
        self.heartbeat.discard(self.sock)
        conn.state = State.CLOSED
        self.link.leave(conn)
        runtime.local.remove(conn)
        if conn.sync_task is not None:
            conn.sync_task.cancel()
        log.info(
            "disconnected",
            extra={
                "channel_id": conn.channel_id,
                "user_id": conn.identity.user_id,
                "conn_id": conn.id,
                "close_code": code,
            },
        )


async def multiplexed_handler(request: web.Request) -> web.StreamResponse:
    """v1.1: one socket, channels joined by ``subscribe``."""
    runtime = request.app[RUNTIME]
    admitted = await _admit(request, None)
    if isinstance(admitted, web.Response):
        return admitted
    subprotocol = await upgraded.checked(request, (SUBPROTOCOL,))
    heartbeat = request.app[HEARTBEAT]
    sock, tail = upgraded.take_over(
        request,
        subprotocol,
        max_size=runtime.settings.max_frame_bytes,
        session=lambda sock: mux.open_socket(runtime, sock, admitted, heartbeat),
    )
    heartbeat.add(sock)
    runtime.sockets += 1
    runtime.metrics.connects.inc()
    log.info("connected", extra={"user_id": admitted.user_id, "endpoint": "multiplexed"})
    sock.feed(tail)
    return upgraded.taken_over()


def origin_allowed(request: web.Request, allowed: Sequence[str]) -> bool:
    """Cross-site WebSocket hijacking guard for browsers.

    Requests without an ``Origin`` header do not come from a browser page and
    are judged by their token alone. With no allow-list, a browser page must
    be served from the edge's own host; ``*`` allows any page."""
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed:
        return True
    if allowed:
        return origin in allowed
    parsed = urlsplit(origin)
    return parsed.netloc.lower() == request.host.lower()


async def index(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if runtime.draining:
        return web.Response(status=503, text="draining\n")
    if not runtime.router.ready():
        return web.Response(status=503, text="shards unreachable\n")
    return web.Response(text="ready\n")


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[RUNTIME].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def dev_token(request: web.Request) -> web.Response:
    """Mint a development token.

    ``{"username": ...}`` gets a token for a new user: a fresh random user
    id every time, so no display name leads to anyone else's identity. With
    ``Authorization: Bearer <token>`` naming a still-valid token this route
    minted, the body is not read and the same user gets a fresh token.
    """
    settings = request.app[SETTINGS]
    current = extract_token(request.headers)
    if current is not None:
        try:
            identity = await request.app[RUNTIME].verifier.verify_dev(current)
        except AuthError:
            raise web.HTTPUnauthorized(
                text="Only a still-valid development token can be renewed; "
                "ask for a new one with a username\n"
            ) from None
        user_id, username = identity.user_id, identity.username
    else:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="Body must be JSON\n") from None
        try:
            username = dev_username(body.get("username") if isinstance(body, dict) else None)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        user_id = dev_user_id()
    ttl = settings.dev_token_ttl_seconds
    if settings.jwt_max_lifetime_seconds:
        ttl = min(ttl, settings.jwt_max_lifetime_seconds)
    token, expires_at = mint_token(
        settings.jwt_secret,
        user_id=user_id,
        username=username,
        ttl_seconds=ttl,
        extra={DEV_CLAIM: True},
    )
    return web.json_response(
        {"token": token, "userId": user_id, "username": username, "expiresAt": expires_at}
    )


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers for every HTTP response, set as it is prepared. A signal and
    not a middleware: a middleware's coroutine would stay alive, and in
    memory, for as long as each WebSocket it wraps."""
    if not isinstance(response, web.WebSocketResponse):
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")


def create_app(settings: Settings) -> web.Application:
    app = web.Application()
    app.on_response_prepare.append(security_headers)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(runtime_ctx)
    app.cleanup_ctx.append(heartbeat_ctx)
    app.router.add_get("/channel/{channel_id}/websocket", websocket_handler)
    app.router.add_get("/websocket", multiplexed_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    if settings.dev_mode:
        app.router.add_post("/dev/token", dev_token)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app
