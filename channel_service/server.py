"""gRPC front of the channel service: the Attach servicer and ``serve()``.

The servicer is thin: it welcomes an edge, reads its batches into the hub
and streams the hub's output back. Wiring (store client, metrics, health,
signals, the SIGTERM drain of ``channel_service.drain``) is in ``serve``.

A shard takes any channel an edge routes to it: it keeps no shard list of
its own. Which shard owns a channel is the edges' rendezvous choice over the
shards they can reach; while edges disagree (a shard just went down or came
back, a DNS answer is not yet everywhere), the store's fence keeps the two
owners from forking the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from channel_service.channel import ChannelPolicy
from channel_service.drain import drain
from channel_service.hub import Hub, HubConfig
from channel_service.metrics import ChannelMetrics
from waddle_common import logs
from waddle_common.grpc_tls import GrpcTls, bind
from waddle_common.grpc_util import server_options
from waddle_common.ops_http import start_ops_server
from waddle_common.settings import Settings
from waddle_common.store_client import StoreClient
from waddle_pb import channel_pb2, channel_pb2_grpc

log = logging.getLogger("channel")

SERVICE_NAME = "waddle.channel.v1.ChannelService"


class ChannelServicer(channel_pb2_grpc.ChannelServiceServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def Attach(
        self,
        request_iterator: AsyncIterator[channel_pb2.EdgeBatch],
        context: grpc.aio.ServicerContext[channel_pb2.EdgeBatch, channel_pb2.ShardBatch],
    ) -> AsyncIterator[channel_pb2.ShardBatch]:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.events or first.events[0].WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first event must be hello")
            return
        edge_id = first.events[0].hello.edge_id
        if not edge_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hello needs an edge_id")
            return
        session = self.hub.open_session(edge_id)
        hub = self.hub
        # First on the stream: the edge counts this shard as reachable (and,
        # while it drains, routes none of its channels here).
        session.send(channel_pb2.ShardEvent(welcome=channel_pb2.Welcome(draining=hub.draining)))

        def take(batch: channel_pb2.EdgeBatch, skip: int = 0) -> None:
            for event in batch.events[skip:]:
                hub.handle(session, event)

        async def read(opening: list[channel_pb2.EdgeBatch]) -> None:
            # No batch stays referenced while the next is awaited: what a
            # stream last carried must not keep anything of a sleeping
            # channel in memory.
            try:
                take(opening.pop(), skip=1)
                async for batch in request_iterator:
                    take(batch)
                    del batch
            finally:
                session.close()

        reader = asyncio.create_task(read([first]), name=f"attach-read:{edge_id}")
        del first
        try:
            async for out in session.batches():
                yield out
                del out
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.hub.close_session(session)


async def serve(settings: Settings) -> None:
    metrics = ChannelMetrics()
    tls = GrpcTls.from_settings(settings)
    store = StoreClient.from_settings(settings, registry=metrics.registry, tls=tls)
    hub = Hub(
        HubConfig(
            default_max_connections=settings.channel_max_connections,
            max_message_length=settings.max_message_length,
            policy=ChannelPolicy(
                recent_limit=settings.recent_messages,
                max_user_connections=settings.user_max_connections,
                online_users_limit=settings.online_users_limit,
                presence_fanout_limit=settings.presence_fanout_limit,
                presence_linger=settings.presence_linger_seconds,
            ),
            publish_timeout=settings.publish_timeout_seconds,
            rejoin_grace=settings.rejoin_grace_seconds,
            idle_seconds=settings.channel_idle_seconds,
            # A join that wakes a channel must still be answered within the
            # edge's join timeout.
            rehydrate_timeout=settings.join_timeout_seconds / 2,
        ),
        store,
        metrics,
    )
    hub.start()
    server = grpc.aio.server(options=server_options())
    channel_pb2_grpc.add_ChannelServiceServicer_to_server(ChannelServicer(hub), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = bind(server, f"{settings.channel_host}:{settings.channel_port}", tls)
    if not port:
        raise SystemExit(f"cannot listen on {settings.channel_host}:{settings.channel_port}")
    await server.start()
    serving = True
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    ops, metrics_port = await start_ops_server(
        metrics.registry, settings.channel_host, settings.channel_metrics_port, lambda: serving
    )
    logs.announce_ready("channel", grpc_port=port, metrics_port=metrics_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    serving = False
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # The edges move this shard's channels elsewhere before it goes; all of
    # it within the grace period (the chart's terminationGracePeriodSeconds
    # adds a margin to it).
    deadline = loop.time() + settings.shutdown_grace_seconds
    await drain(hub, settings.shutdown_grace_seconds)
    await hub.stop()
    await server.stop(max(0.0, deadline - loop.time()))
    await ops.cleanup()
    await store.close()


def main() -> None:
    settings = Settings()
    logs.setup("channel", settings.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    asyncio.run(serve(settings))
