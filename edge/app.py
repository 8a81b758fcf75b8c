"""The edge's HTTP surface: the WebSocket endpoint, the chat page, health,
metrics and (in development mode only) a token minting route.

Shared resources live on the application under typed ``AppKey``s and are
opened and closed by one cleanup context; each WebSocket is served by one
handler coroutine that unregisters in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSMessage, WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge import protocol
from edge.auth import SUBPROTOCOL, AuthError, TokenVerifier, dev_user_id, extract_token, mint_token
from edge.connection import Connection, Limits, LocalChannels, State
from edge.expiry import ExpiryWatch
from edge.limits import ConnectionBudget, RateConfig
from edge.metrics import EdgeMetrics
from edge.replay import Replayer
from edge.shards import ShardLink, ShardRouter
from waddle_common import wire
from waddle_common.grpc_tls import GrpcTls
from waddle_common.grpc_util import channel_options
from waddle_common.settings import Settings
from waddle_common.store_client import StoreClient
from waddle_pb import channel_pb2

log = logging.getLogger("edge")

STATIC_DIR = Path(__file__).parent / "static"
CHANNEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self'; "
    "script-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass(eq=False)
class EdgeRuntime:
    settings: Settings
    metrics: EdgeMetrics
    verifier: TokenVerifier
    local: LocalChannels
    router: ShardRouter
    store: StoreClient
    replayer: Replayer
    rates: RateConfig
    expiry: ExpiryWatch
    draining: bool = False
    conn_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


SETTINGS = web.AppKey("settings", Settings)
RUNTIME = web.AppKey("runtime", EdgeRuntime)


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = EdgeMetrics()
    local = LocalChannels(metrics, Limits(send_buffer_bytes=settings.send_buffer_bytes))
    tls = GrpcTls.from_settings(settings)
    store = StoreClient.from_settings(settings, registry=metrics.registry, tls=tls)
    router = ShardRouter(
        settings.shard_list,
        settings.edge_id,
        local,
        metrics,
        options=channel_options(),
        publish_timeout=settings.publish_timeout_seconds * 1.5,
        tls=tls,
    )
    runtime = EdgeRuntime(
        settings=settings,
        metrics=metrics,
        verifier=TokenVerifier(
            settings.jwt_secret,
            algorithms=settings.jwt_algorithms,
            jwks_url=settings.jwt_jwks_url,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway_seconds,
        ),
        local=local,
        router=router,
        store=store,
        replayer=Replayer(store, local, metrics),
        rates=RateConfig(
            message_rate=settings.message_rate,
            message_burst=settings.message_burst,
            typing_rate=settings.typing_rate,
            typing_burst=settings.typing_burst,
            frame_rate=settings.frame_rate,
            frame_burst=settings.frame_burst,
            abuse_burst=settings.abuse_burst,
        ),
        expiry=ExpiryWatch(metrics, live=lambda: len(local)),
    )
    metrics.connections.set_function(lambda: len(local))
    router.warm_up()
    app[RUNTIME] = runtime
    yield
    await drain(runtime, 0)
    await runtime.expiry.stop()
    await runtime.replayer.stop()
    await router.close()
    await store.close()


async def drain(runtime: EdgeRuntime, grace: float) -> None:
    """Stop accepting, let unsettled publishes finish (up to ``grace``), then
    close every socket with 1012 so clients reconnect elsewhere and sync."""
    runtime.draining = True
    deadline = time.monotonic() + grace
    while runtime.router.inflight() and time.monotonic() < deadline:  # noqa: ASYNC110
        # Settlement arrives over the shard streams; a short poll keeps this
        # independent of how many links there are.
        await asyncio.sleep(0.05)
    conns = list(runtime.local.by_id.values())
    for conn in conns:
        conn.close(wire.CLOSE_RESTART, "server restart")
    waits = [c.ws.close(code=wire.CLOSE_RESTART) for c in conns if c.ws is not None]
    if waits:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 5)


def _refuse(
    runtime: EdgeRuntime, status: int, text: str, reason: str, retry: bool = False
) -> web.Response:
    runtime.metrics.refusals.labels(reason).inc()
    headers = {"Retry-After": "5"} if retry else None
    return web.Response(status=status, text=text + "\n", headers=headers)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    settings = runtime.settings
    channel_id = request.match_info["channel_id"]
    if not CHANNEL_ID_RE.match(channel_id):
        return _refuse(runtime, 400, "Invalid channel id", "bad_channel")
    if runtime.draining:
        return _refuse(runtime, 503, "Server restarting", "draining", retry=True)
    if not origin_allowed(request, settings.allowed_origins):
        return _refuse(runtime, 403, "Origin not allowed", "origin")
    if len(runtime.local) >= settings.edge_max_connections:
        return _refuse(runtime, 503, "Edge at capacity", "edge_full", retry=True)
    token = extract_token(request.headers)
    if token is None:
        return _refuse(runtime, 401, "Unauthorized", "unauthorized")
    try:
        identity = await runtime.verifier.verify(token)
    except AuthError as exc:
        log.info("token refused", extra={"reason": str(exc), "channel_id": channel_id})
        return _refuse(runtime, 401, "Unauthorized", "unauthorized")
    if not identity.may_join(channel_id):
        return _refuse(runtime, 403, "Forbidden", "forbidden")

    conn = Connection(
        id=next(runtime.conn_ids),
        channel_id=channel_id,
        identity=identity,
        joined_at_ms=time.time_ns() // 1_000_000,
    )
    link = runtime.router.link_for(channel_id)
    runtime.local.add(conn)

    try:
        result = await asyncio.wait_for(link.join(conn), settings.join_timeout_seconds)
    except TimeoutError:
        link.leave(conn)
        runtime.local.remove(conn)
        return _refuse(runtime, 503, "Channel unavailable", "unavailable", retry=True)
    except BaseException:
        link.leave(conn)
        runtime.local.remove(conn)
        raise
    if not result.ok:
        link.leave(conn)
        runtime.local.remove(conn)
        if result.refusal == "channel_full":
            return _refuse(runtime, 503, "Channel full", "channel_full", retry=True)
        if result.refusal == "user_limit":
            return _refuse(runtime, 429, "Too many connections", "user_limit", retry=True)
        return _refuse(runtime, 503, "Channel unavailable", "unavailable", retry=True)
    conn.cursor = conn.floor = result.last_seq
    # This frame lives as long as the connection: keep nothing big in it
    # (the JoinResult carries the whole initial_state).
    initial_state = result.initial_state
    del result, token

    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        max_msg_size=settings.max_frame_bytes,
        heartbeat=settings.heartbeat_seconds,
        compress=False,
    )
    try:
        await ws.prepare(request)
    except BaseException:
        link.leave(conn)
        runtime.local.remove(conn)
        raise

    conn.ws = ws
    conn.transport = request.transport
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
        if conn.close_code is not None and not ws.closed:
            # Closed by policy from inside the handler: send that code, not 1000.
            with contextlib.suppress(Exception):
                await ws.close(code=conn.close_code, message=conn.close_reason.encode())
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


def _refuse_frame(
    runtime: EdgeRuntime, conn: Connection, budget: ConnectionBudget, payload: bytes
) -> bool:
    """Send an error; return False once the connection must be closed for abuse."""
    conn.send(payload, runtime.metrics, runtime.local.limits, "error")
    if budget.strike(asyncio.get_running_loop().time()):
        runtime.metrics.refusals.labels("abuse").inc()
        log.info(
            "closing abusive connection",
            extra={"channel_id": conn.channel_id, "user_id": conn.identity.user_id},
        )
        conn.close(wire.CLOSE_POLICY, "too many refused frames")
        return False
    return True


def _rate_limited(
    runtime: EdgeRuntime,
    conn: Connection,
    budget: ConnectionBudget,
    wait: float,
    client_msg_id: str | None,
    *,
    abuse: bool,
) -> bool:
    """Refuse an over-budget frame. Going over the message or typing budget
    is ordinary back-pressure (a client flushing its queue after a
    reconnect); going over the budget for all frames is abuse."""
    runtime.metrics.frames_in.labels("rate_limited").inc()
    payload = wire.error_frame(
        wire.RATE_LIMITED, retryAfterMs=max(1, math.ceil(wait * 1000)), clientMsgId=client_msg_id
    )
    if abuse:
        return _refuse_frame(runtime, conn, budget, payload)
    conn.send(payload, runtime.metrics, runtime.local.limits, "error")
    return True


def _on_frame(
    runtime: EdgeRuntime,
    conn: Connection,
    link: ShardLink,
    budget: ConnectionBudget,
    msg: WSMessage,
) -> bool:
    """Handle one client frame; return False when the connection must end.

    Synchronous on purpose: nothing here waits, and an idle connection then
    costs one coroutine frame (the handler's), not a stack of them."""
    metrics, limits = runtime.metrics, runtime.local.limits
    now = asyncio.get_running_loop().time()
    if msg.type is WSMsgType.BINARY:
        metrics.frames_in.labels("binary").inc()
        return _refuse_frame(runtime, conn, budget, wire.error_frame(wire.BINARY_UNSUPPORTED))
    if msg.type is not WSMsgType.TEXT:
        return msg.type is not WSMsgType.ERROR
    try:
        frame = protocol.parse_client_frame(
            msg.data, max_message_length=runtime.settings.max_message_length
        )
    except protocol.ProtocolError as exc:
        metrics.frames_in.labels("invalid").inc()
        return _refuse_frame(runtime, conn, budget, exc.frame())
    wait = budget.frames.take(now)
    if wait:
        cmid = frame.client_msg_id if isinstance(frame, protocol.SendMessage) else None
        return _rate_limited(runtime, conn, budget, wait, cmid, abuse=True)
    metrics.frames_in.labels(protocol.frame_type(frame)).inc()
    match frame:
        case protocol.Ping():
            conn.send(wire.PONG_FRAME, metrics, limits, "pong")
        case protocol.SendMessage(content=content, thread_id=thread_id, client_msg_id=cmid):
            wait = budget.messages.take(now)
            if wait:
                return _rate_limited(runtime, conn, budget, wait, cmid, abuse=False)
            link.publish(
                conn,
                channel_pb2.Publish(
                    conn_id=conn.id,
                    channel_id=conn.channel_id,
                    content=content,
                    thread_id=thread_id or "",
                    client_msg_id=cmid or str(uuid.uuid4()),
                    client_supplied_id=cmid is not None,
                    received_at_ns=time.time_ns(),
                ),
            )
        case protocol.SetTyping(is_typing=is_typing):
            wait = budget.typing.take(now)
            if wait:
                return _rate_limited(runtime, conn, budget, wait, None, abuse=False)
            link.typing(conn, is_typing)
        case protocol.SetPresence(status=status):
            conn.status = status
            link.presence(conn, status)
        case protocol.Sync():
            runtime.replayer.client_sync(conn, frame)
    return True


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
    settings = request.app[SETTINGS]
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="Body must be JSON\n") from None
    username = body.get("username") if isinstance(body, dict) else None
    if not isinstance(username, str) or not 1 <= len(username.strip()) <= 64:
        raise web.HTTPBadRequest(text="username must be 1 to 64 characters\n")
    username = username.strip()
    user_id = dev_user_id(username)
    token, expires_at = mint_token(
        settings.jwt_secret,
        user_id=user_id,
        username=username,
        ttl_seconds=settings.dev_token_ttl_seconds,
    )
    return web.json_response(
        {"token": token, "userId": user_id, "username": username, "expiresAt": expires_at}
    )


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    if not isinstance(response, web.WebSocketResponse):
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[security_headers])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_runtime_ctx)
    app.router.add_get("/channel/{channel_id}/websocket", websocket_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    if settings.dev_mode:
        app.router.add_post("/dev/token", dev_token)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app
