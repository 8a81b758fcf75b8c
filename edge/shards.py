"""The edge's side of the Attach streams: one ``ShardLink`` per channel shard.

A link multiplexes every local connection whose channel the shard owns.
It opens its stream lazily (on the first connection routed to it), batches
outgoing events (everything queued while the previous batch was written
goes out as one ``EdgeBatch``), and when the stream breaks it reconnects
with jittered backoff, then re-registers every connection it carries
(``rejoin``: silent, never refused) and re-sends every publish that has
not been settled, with the same idempotency key, so the owner's store
deduplicates. A publish not settled within ``publish_timeout`` is answered
with a retryable ``unavailable`` error; none is dropped silently.

A shard that wakes a hibernated channel asks for its connections again
(``Rehydrate``): the link answers at once with one ``Rehydrated`` that
re-registers every connection of that channel it carries (silently; those
still waiting for their first ``JoinResult`` are already on the stream).
A ``Head`` (the head of a channel a shard took over asleep) makes the
connections that are behind it catch up from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import grpc

from edge.connection import Connection, LocalChannels, State
from edge.metrics import EdgeMetrics
from waddle_common import wire
from waddle_common.grpc_tls import GrpcTls, open_channel
from waddle_common.routing import owner_of
from waddle_pb import channel_pb2, channel_pb2_grpc

log = logging.getLogger("edge.shards")


class ShardLink:
    def __init__(
        self,
        address: str,
        edge_id: str,
        channel: grpc.aio.Channel,
        local: LocalChannels,
        metrics: EdgeMetrics,
        *,
        publish_timeout: float,
    ) -> None:
        self.address = address
        self.edge_id = edge_id
        self._stub = channel_pb2_grpc.ChannelServiceStub(channel)
        self.local = local
        self.metrics = metrics
        self.publish_timeout = publish_timeout
        self.members: dict[int, Connection] = {}
        self.joins: dict[int, asyncio.Future[channel_pb2.JoinResult]] = {}
        # (conn id, client_msg_id) -> (publish, deadline); dicts keep send order.
        self.inflight: dict[tuple[int, str], tuple[channel_pb2.Publish, float]] = {}
        self.up = asyncio.Event()
        self._outbox: list[channel_pb2.EdgeEvent] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- API for the connection handlers -----------------------------------

    def ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"link:{self.address}")

    def _queue(self, event: channel_pb2.EdgeEvent) -> None:
        if self.up.is_set():
            self._outbox.append(event)
            self._wake.set()

    def join(self, conn: Connection) -> asyncio.Future[channel_pb2.JoinResult]:
        self.ensure_started()
        self.members[conn.id] = conn
        future: asyncio.Future[channel_pb2.JoinResult] = asyncio.get_running_loop().create_future()
        self.joins[conn.id] = future
        self._queue(self._join_event(conn, rejoin=False))
        return future

    def leave(self, conn: Connection) -> None:
        self.members.pop(conn.id, None)
        future = self.joins.pop(conn.id, None)
        if future is not None and not future.done():
            future.cancel()
        for key in [k for k in self.inflight if k[0] == conn.id]:
            del self.inflight[key]
        self._queue(
            channel_pb2.EdgeEvent(
                leave=channel_pb2.Leave(conn_id=conn.id, channel_id=conn.channel_id)
            )
        )

    def publish(self, conn: Connection, pub: channel_pb2.Publish) -> None:
        self.inflight[(conn.id, pub.client_msg_id)] = (pub, time.monotonic() + self.publish_timeout)
        self._queue(channel_pb2.EdgeEvent(publish=pub))

    def typing(self, conn: Connection, is_typing: bool) -> None:
        self._queue(
            channel_pb2.EdgeEvent(
                typing=channel_pb2.Typing(
                    conn_id=conn.id, channel_id=conn.channel_id, is_typing=is_typing
                )
            )
        )

    def presence(self, conn: Connection, status: str) -> None:
        self._queue(
            channel_pb2.EdgeEvent(
                presence=channel_pb2.Presence(
                    conn_id=conn.id, channel_id=conn.channel_id, status=status
                )
            )
        )

    def read(self, conn: Connection, seq: int) -> None:
        self._queue(
            channel_pb2.EdgeEvent(
                read=channel_pb2.Read(conn_id=conn.id, channel_id=conn.channel_id, seq=seq)
            )
        )

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- the stream ---------------------------------------------------------

    def _join_event(self, conn: Connection, *, rejoin: bool) -> channel_pb2.EdgeEvent:
        return channel_pb2.EdgeEvent(join=self._join(conn, rejoin=rejoin))

    @staticmethod
    def _join(conn: Connection, *, rejoin: bool) -> channel_pb2.Join:
        ident = conn.identity
        return channel_pb2.Join(
            conn_id=conn.id,
            channel_id=conn.channel_id,
            rejoin=rejoin,
            member=channel_pb2.Member(
                user_id=ident.user_id,
                username=ident.username,
                avatar_url=ident.avatar_url,
                permissions=sorted(ident.permissions),
                joined_at_ms=conn.joined_at_ms,
                status=conn.status,
            ),
        )

    def _registered(self, channel_id: str) -> list[Connection]:
        """This link's connections of ``channel_id`` that the owner has answered."""
        members = self.local.by_channel.get(channel_id)
        if not members:
            return []
        return [c for c in members.values() if c.id in self.members and c.id not in self.joins]

    def _rehydrate(self, channel_id: str) -> None:
        self._queue(
            channel_pb2.EdgeEvent(
                rehydrated=channel_pb2.Rehydrated(
                    channel_id=channel_id,
                    members=[self._join(c, rejoin=True) for c in self._registered(channel_id)],
                )
            )
        )

    def _opening_batch(self) -> channel_pb2.EdgeBatch:
        events = [channel_pb2.EdgeEvent(hello=channel_pb2.Hello(edge_id=self.edge_id))]
        for conn in self.members.values():
            # A connection still waiting for its first JoinResult joins anew
            # (and may still be refused); the others are re-registrations.
            events.append(self._join_event(conn, rejoin=conn.id not in self.joins))
        events.extend(channel_pb2.EdgeEvent(publish=pub) for pub, _ in self.inflight.values())
        return channel_pb2.EdgeBatch(events=events)

    async def _run(self) -> None:
        attempt = 0
        sweeper = asyncio.create_task(self._sweep(), name=f"sweep:{self.address}")
        try:
            while not self._stopping:
                answered = await self._session()
                attempt = 0 if answered else attempt + 1
                if self._stopping:
                    break
                # Full jitter; the first retry after a working stream is quick.
                await asyncio.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def _session(self) -> bool:
        """One Attach stream, from open to break. Returns whether the shard answered."""
        call = self._stub.Attach()
        writer: asyncio.Task[None] | None = None
        answered = False
        try:
            self._outbox.clear()
            opening = self._opening_batch()
            # From here on, events are queued for this stream; whatever the
            # opening batch did not contain is written after it, in order.
            self.up.set()
            self.metrics.shard_streams.inc()
            await call.write(opening)
            writer = asyncio.create_task(self._write_loop(call))
            while True:
                batch = await call.read()
                if batch is grpc.aio.EOF:
                    break
                if not answered:
                    answered = True
                    log.info("attached to shard", extra={"shard": self.address})
                self._dispatch(batch)
        except grpc.aio.AioRpcError as exc:
            if not self._stopping:
                # Failed reconnection attempts are routine while a shard restarts.
                (log.warning if answered else log.debug)(
                    "shard stream broke" if answered else "shard unreachable",
                    extra={"shard": self.address, "code": exc.code().name},
                )
        finally:
            self.metrics.shard_streams.dec()
            self.up.clear()
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await writer
            call.cancel()
        return answered

    async def _write_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._outbox:
                events, self._outbox = self._outbox, []
                await call.write(channel_pb2.EdgeBatch(events=events))

    def _dispatch(self, batch: channel_pb2.ShardBatch) -> None:
        local = self.local
        for event in batch.events:
            kind = event.WhichOneof("kind")
            if kind == "deliver":
                local.deliver(event.deliver)
            elif kind == "reply":
                reply = event.reply
                if reply.final:
                    self.inflight.pop((reply.conn_id, reply.client_msg_id), None)
                ack = b'"type":"ack"' in reply.payload[:16]
                local.reply(reply, reply.type or ("ack" if ack else "error"))
            elif kind == "join_result":
                result = event.join_result
                future = self.joins.pop(result.conn_id, None)
                if future is not None:
                    if not future.done():
                        future.set_result(result)
                else:
                    conn = self.members.get(result.conn_id)
                    if conn is not None:
                        local.rejoined(conn, result.last_seq)
            elif kind == "rehydrate":
                self._rehydrate(event.rehydrate.channel_id)
            elif kind == "head":
                head = event.head
                for conn in self._registered(head.channel_id):
                    local.rejoined(conn, head.last_seq)

    async def _sweep(self) -> None:
        """Answer publishes the owner has not settled in time (one timer per link)."""
        while True:
            await asyncio.sleep(min(1.0, self.publish_timeout / 4))
            if not self.inflight:
                continue
            now = time.monotonic()
            expired = [k for k, (_, deadline) in self.inflight.items() if deadline <= now]
            for key in expired:
                pub, _ = self.inflight.pop(key)
                conn = self.members.get(pub.conn_id)
                if conn is not None and conn.state is not State.CLOSED:
                    conn.send(
                        wire.error_frame(
                            wire.UNAVAILABLE,
                            clientMsgId=pub.client_msg_id if pub.client_supplied_id else None,
                            channel_id=pub.channel_id,
                        ),
                        self.metrics,
                        self.local.limits,
                        "error",
                    )


class ShardRouter:
    """Maps channels to shard links by rendezvous hashing over the shard list."""

    def __init__(
        self,
        shards: Sequence[str],
        edge_id: str,
        local: LocalChannels,
        metrics: EdgeMetrics,
        *,
        options: Sequence[tuple[str, Any]],
        publish_timeout: float,
        tls: GrpcTls | None = None,
    ) -> None:
        self.shards = tuple(shards)
        self.channels = {
            address: open_channel(address, tls or GrpcTls(), options=options)
            for address in self.shards
        }
        self.links = {
            address: ShardLink(
                address,
                edge_id,
                self.channels[address],
                local,
                metrics,
                publish_timeout=publish_timeout,
            )
            for address in self.shards
        }

    def warm_up(self) -> None:
        """Start connecting to every shard now, so readiness does not wait
        for the first client (streams themselves still open lazily)."""
        for ch in self.channels.values():
            ch.get_state(try_to_connect=True)

    def link_for(self, channel_id: str) -> ShardLink:
        return self.links[owner_of(channel_id, self.shards)]

    def ready(self) -> bool:
        """Every shard is reachable (connecting to any that is not yet)."""
        return all(
            ch.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY
            for ch in self.channels.values()
        )

    def inflight(self) -> int:
        return sum(len(link.inflight) for link in self.links.values())

    async def close(self) -> None:
        for link in self.links.values():
            await link.stop()
        for ch in self.channels.values():
            await ch.close()
