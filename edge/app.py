"""The edge's HTTP surface: the WebSocket endpoints (v1, one channel per
socket, and v1.1, many), the chat page, health, metrics and (in
development mode only) a token minting route.

Shared resources live on the application (``edge.runtime``); each WebSocket
is served by one handler coroutine that unregisters in ``finally``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSMessage, WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge import frames, joining, mux, protocol
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
from edge.connection import Connection, State, close_ws
from edge.heartbeat import HEARTBEAT, heartbeat_ctx
from edge.limits import ConnectionBudget
from edge.runtime import RUNTIME, SETTINGS, EdgeRuntime, drain, refuse, runtime_ctx
from edge.shards import ShardRouter
from waddle_common import wire
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


def _websocket(settings: Settings) -> web.WebSocketResponse:
    # No per-socket heartbeat timer: the edge's one ``Heartbeat`` pings every socket.
    return web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        max_msg_size=settings.max_frame_bytes,
        compress=False,
    )


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
    # This frame lives as long as the connection: keep nothing big in it.
    initial_state = outcome.initial_state
    del outcome

    ws = _websocket(settings)
    try:
        await ws.prepare(request)
    except BaseException:
        link.leave(conn)
        runtime.local.remove(conn)
        raise

    conn.ws = ws
    conn.transport = request.transport
    request.app[HEARTBEAT].add(ws, request.transport)
    runtime.sockets += 1
    runtime.metrics.connects.inc()
    log.info(
        "connected",
        extra={"channel_id": channel_id, "user_id": identity.user_id, "conn_id": conn.id},
    )
    runtime.expiry.watch(conn)
    try:
        conn.send(initial_state, runtime.metrics, runtime.local.limits, "initial_state")
        del initial_state
        runtime.local.activate(conn)
        # Budgets are made on the first frame: a silent connection costs none.
        budget: ConnectionBudget | None = None
        async for msg in ws:
            if conn.state is State.CLOSED:
                break
            if budget is None:
                budget = ConnectionBudget.create(runtime.rates, asyncio.get_running_loop().time())
            if not _on_frame(runtime, conn, link, budget, msg):
                break
    finally:
        runtime.sockets -= 1
        request.app[HEARTBEAT].discard(ws)
        if conn.close_code is not None and not ws.closed:
            # Closed by policy from inside the handler: send that code, not 1000.
            await close_ws(ws, conn.transport, conn.close_code, conn.close_reason)
        conn.state = State.CLOSED
        link.leave(conn)
        runtime.local.remove(conn)
        if conn.sync_task is not None:
            conn.sync_task.cancel()
        log.info(
            "disconnected",
            extra={
                "channel_id": channel_id,
                "user_id": identity.user_id,
                "conn_id": conn.id,
                "close_code": ws.close_code,
            },
        )
    return ws


async def multiplexed_handler(request: web.Request) -> web.StreamResponse:
    """v1.1: one socket, channels joined by ``subscribe``."""
    runtime = request.app[RUNTIME]
    admitted = await _admit(request, None)
    if isinstance(admitted, web.Response):
        return admitted
    ws = _websocket(runtime.settings)
    await ws.prepare(request)
    request.app[HEARTBEAT].add(ws, request.transport)
    runtime.sockets += 1
    runtime.metrics.connects.inc()
    log.info("connected", extra={"user_id": admitted.user_id, "endpoint": "multiplexed"})
    try:
        await mux.serve(runtime, request, ws, admitted)
    finally:
        runtime.sockets -= 1
        request.app[HEARTBEAT].discard(ws)
        log.info(
            "disconnected",
            extra={"user_id": admitted.user_id, "close_code": ws.close_code},
        )
    return ws


def _on_frame(
    runtime: EdgeRuntime,
    conn: Connection,
    link: ShardRouter,
    budget: ConnectionBudget,
    msg: WSMessage,
) -> bool:
    """Handle one v1 client frame; return False when the connection must end."""
    if msg.type is WSMsgType.BINARY:
        runtime.metrics.frames_in.labels("binary").inc()
        return frames.refuse_frame(runtime, conn, budget, wire.error_frame(wire.BINARY_UNSUPPORTED))
    if msg.type is not WSMsgType.TEXT:
        return msg.type is not WSMsgType.ERROR
    try:
        frame = protocol.parse_client_frame(
            msg.data, max_message_length=runtime.settings.max_message_length
        )
    except protocol.ProtocolError as exc:
        runtime.metrics.frames_in.labels("invalid").inc()
        return frames.refuse_frame(runtime, conn, budget, exc.frame(conn.channel_id))
    refused = frames.take_frame(runtime, conn, budget, frame, conn.channel_id)
    if refused is not None:
        return refused
    return frames.channel_frame(runtime, conn, link, budget, frame)


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
