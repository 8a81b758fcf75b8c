"""One edge's shared state and its lifetime: settings, metrics, the token
verifier, the local connection registry, the shard links and their
membership source, the store client,
replay and history, opened and closed by one cleanup context; and the
drain that SIGTERM runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from edge import upgraded
from edge.auth import TokenVerifier
from edge.connection import Connection, Limits, LocalChannels
from edge.cursor_reads import CURSOR_TIMEOUT, CursorReads
from edge.expiry import ExpiryWatch
from edge.history import HistoryServer
from edge.limits import RateConfig
from edge.membership import DnsMembership
from edge.metrics import EdgeMetrics
from edge.replay import ReplayBudget, Replayer
from edge.shards import ShardRouter
from waddle_common import wire
from waddle_common.grpc_tls import GrpcTls
from waddle_common.grpc_util import shard_channel_options
from waddle_common.settings import Settings
from waddle_common.store_client import StoreClient


def fresh_conn_ids() -> itertools.count[int]:
    """Connection ids for this process, starting at a random point.

    The owner keys connections by (edge id, connection id) and keeps a
    departed edge's connections for the rejoin grace. An edge restarted
    under the same id that counted from 1 again would hand a new user the
    id of an old connection still registered there, and the owner would
    take the new user's messages for the old one's. A random 62-bit start
    makes that collision practically impossible."""
    return itertools.count(secrets.randbits(62) + 1)


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
    history: HistoryServer
    cursors: CursorReads  # joiners' read cursors, batched
    draining: bool = False
    sockets: int = 0  # open client WebSockets, both endpoints
    # The control connection of each open multiplexed socket (its frames
    # about no channel), so that a drain reaches sockets with no subscription.
    mux_controls: set[Connection] = field(default_factory=set)
    conn_ids: itertools.count[int] = field(default_factory=lambda: fresh_conn_ids())


SETTINGS = web.AppKey("settings", Settings)
RUNTIME = web.AppKey("runtime", EdgeRuntime)


async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = EdgeMetrics()
    local = LocalChannels(
        metrics,
        Limits(send_buffer_bytes=settings.send_buffer_bytes),
        write_interval=settings.edge_write_interval_ms / 1000,
    )
    tls = GrpcTls.from_settings(settings)
    store = StoreClient.from_settings(settings, registry=metrics.registry, tls=tls)
    router = ShardRouter(
        settings.shard_list,
        settings.edge_id,
        local,
        metrics,
        options=shard_channel_options(),
        publish_timeout=settings.publish_timeout_seconds * 1.5,
        tls=tls,
        down_after=settings.shard_down_seconds,
        up_after=settings.shard_up_seconds,
    )
    replayer = Replayer(
        store,
        local,
        metrics,
        stall_after=settings.send_stall_seconds,
        budget=ReplayBudget(
            user_rate=settings.replay_rate,
            user_burst=settings.replay_burst,
            edge_rate=settings.edge_replay_rate,
            edge_burst=settings.edge_replay_burst,
        ),
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
            max_lifetime=settings.jwt_max_lifetime_seconds,
        ),
        local=local,
        router=router,
        store=store,
        replayer=replayer,
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
        history=HistoryServer(store, replayer.budgets, metrics, local.limits),
        cursors=CursorReads(store.get_read_cursors, timeout=CURSOR_TIMEOUT),
    )
    metrics.connections.set_function(lambda: runtime.sockets)
    metrics.subscriptions.set_function(lambda: len(local))
    membership: asyncio.Task[None] | None = None
    if settings.channel_shards_dns:
        dns = DnsMembership(
            settings.channel_shards_dns,
            interval=settings.channel_shards_dns_seconds,
            nameserver=settings.dns_server,
        )
        # The first answer before serving; without one, the static list stands.
        await dns.refresh(router.set_shards)
        membership = asyncio.create_task(dns.run(router.set_shards), name="shard-membership")
    router.start()
    app[RUNTIME] = runtime
    yield
    if membership is not None:
        membership.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await membership
    await drain(runtime, 0)
    await runtime.expiry.stop()
    await runtime.replayer.stop()
    await runtime.history.stop()
    await runtime.cursors.close()
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
    conns = [*runtime.local.by_id.values(), *runtime.mux_controls]
    for conn in conns:
        conn.close(wire.CLOSE_RESTART, "server restart")
    # Each socket has its close frame; its peer has the close timeout to answer.
    sockets = {id(c.ws): c.ws for c in conns if c.ws is not None}
    waits = [sock.wait_closed() for sock in sockets.values()]
    if waits:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*waits, return_exceptions=True), upgraded.CLOSE_TIMEOUT + 1
            )


def refuse(
    runtime: EdgeRuntime, status: int, text: str, reason: str, retry: bool = False
) -> web.Response:
    runtime.metrics.refusals.labels(reason).inc()
    headers = {"Retry-After": "5"} if retry else None
    return web.Response(status=status, text=text + "\n", headers=headers)
