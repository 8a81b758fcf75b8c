"""The edge's side of the Attach streams: one ``ShardLink`` per channel shard.

A link multiplexes every local connection whose channel the shard owns.
It keeps its stream open from the edge's start (the router must know which
shards it can reach before a channel needs one), batches
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

``ShardRouter`` keeps the ring: the known shards (``edge.membership``: a
static list or DNS) minus those that are down or draining. Every link keeps
its stream open, so the edge knows which shards it can reach:

* a shard whose stream has not been welcomed for ``down_after`` seconds is
  *down* and leaves the ring;
* a down shard welcomed (not draining) for ``up_after`` seconds is back;
* a shard that sends ``Draining`` (it is shutting down, every publish it took
  is settled) leaves the ring at once.

Whenever the ring changes, each local channel whose rendezvous owner changed
is *moved*: its connections go to the new owner's link and are registered
there silently (``rejoin``; one still waiting for its first ``JoinResult``
joins anew), then its unsettled publishes follow with their idempotency
keys. A publish the old owner may still settle (it is reachable and not
draining) stays with the old link, so it is neither sent twice nor answered
twice; if that stream breaks first, it follows the channel. A reachable old
owner gets a ``Leave`` marked ``moved`` for each moved connection: it
forgets the connection without announcing anything, so it holds no stale
member and nobody still routed there sees a departure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc

from edge.connection import Connection, LocalChannels, State
from edge.metrics import EdgeMetrics
from waddle_common import wire
from waddle_common.grpc_tls import GrpcTls, open_channel
from waddle_common.routing import owner_of
from waddle_pb import channel_pb2, channel_pb2_grpc

log = logging.getLogger("edge.shards")

# Largest batch written to an Attach stream at once (gRPC's limit is 16 MiB):
# an opening batch re-registering many connections, or what piled up while
# the stream was slow, goes out in several.
MAX_BATCH_BYTES = 4 * 1024 * 1024


def batches(events: list[channel_pb2.EdgeEvent]) -> Iterator[channel_pb2.EdgeBatch]:
    """``events`` in order, as batches of at most ``MAX_BATCH_BYTES`` (one event at least)."""
    start, size = 0, 0
    for i, event in enumerate(events):
        size += event.ByteSize()
        if size > MAX_BATCH_BYTES and i > start:
            yield channel_pb2.EdgeBatch(events=events[start:i])
            start, size = i, event.ByteSize()
    if start < len(events):
        yield channel_pb2.EdgeBatch(events=events[start:])


# A link to a draining shard reconnects this much later: the old process
# exits once no edge stream is left, and a restarted one welcomes us anew.
DRAINING_RETRY = 1.0


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
        on_health: Callable[[ShardLink], None] = lambda link: None,
    ) -> None:
        self.address = address
        self.edge_id = edge_id
        self.channel = channel
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
        # Health, read by the router: when the current stream was welcomed
        # (None: no welcomed stream), since when there has been none, whether
        # the shard is draining, and whether the router counts it as down.
        self.on_health = on_health
        self.welcomed_at: float | None = None
        self.welcomes = 0  # streams welcomed so far
        self.broken_since = time.monotonic()
        self.draining = False
        self.down = False
        self._call: grpc.aio.StreamStreamCall | None = None

    @property
    def attached(self) -> bool:
        return self.welcomed_at is not None

    @property
    def settles(self) -> bool:
        """The shard can still answer what it was sent (attached, not draining)."""
        return self.welcomed_at is not None and not self.draining

    def end_stream(self) -> None:
        """End the current stream (the shard is draining and we moved away)."""
        if self._call is not None:
            self._call.cancel()

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
            seen_seq=conn.cursor,
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

    def _opening_events(self) -> list[channel_pb2.EdgeEvent]:
        events = [channel_pb2.EdgeEvent(hello=channel_pb2.Hello(edge_id=self.edge_id))]
        for conn in self.members.values():
            # A connection still waiting for its first JoinResult joins anew
            # (and may still be refused); the others are re-registrations.
            events.append(self._join_event(conn, rejoin=conn.id not in self.joins))
        events.extend(channel_pb2.EdgeEvent(publish=pub) for pub, _ in self.inflight.values())
        return events

    async def _run(self) -> None:
        attempt = 0
        sweeper = asyncio.create_task(self._sweep(), name=f"sweep:{self.address}")
        try:
            while not self._stopping:
                answered = await self._session()
                attempt = 0 if answered else attempt + 1
                if self._stopping:
                    break
                if self.draining:
                    await asyncio.sleep(DRAINING_RETRY)
                    continue
                # Full jitter; the first retry after a working stream is quick.
                await asyncio.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def _session(self) -> bool:
        """One Attach stream, from open to break. Returns whether the shard answered."""
        call = self._stub.Attach()
        self._call = call
        writer: asyncio.Task[None] | None = None
        answered = False
        try:
            self._outbox.clear()
            opening = self._opening_events()
            # From here on, events are queued for this stream; whatever the
            # opening batch did not contain is written after it, in order.
            self.up.set()
            self.metrics.shard_streams.inc()
            for batch in batches(opening):
                await call.write(batch)
            del opening
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
        except asyncio.CancelledError:
            if self._stopping or not self.draining:
                raise
            # end_stream() on a draining shard: reconnect later.
        finally:
            self.metrics.shard_streams.dec()
            self.up.clear()
            self._call = None
            if self.welcomed_at is not None:
                self.welcomed_at = None
                self.broken_since = time.monotonic()
                self.on_health(self)
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(
                    asyncio.CancelledError, asyncio.InvalidStateError, grpc.aio.AioRpcError
                ):
                    await writer
            call.cancel()
        return answered

    async def _write_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._outbox:
                events, self._outbox = self._outbox, []
                for batch in batches(events):
                    await call.write(batch)
                del events

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
                        local.answered(result.conn_id)
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
            elif kind == "welcome":
                self.welcomed_at = time.monotonic()
                self.welcomes += 1
                self.draining = event.welcome.draining
                self.on_health(self)
            elif kind == "draining":
                self.draining = True
                self.on_health(self)

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
    """Maps channels to shard links by rendezvous hashing over the ring, and
    moves local channels when the ring changes (see the module doc)."""

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
        down_after: float = 3.0,
        up_after: float = 10.0,
    ) -> None:
        if not shards:
            raise ValueError("no channel shards configured")
        self.edge_id = edge_id
        self.local = local
        self.metrics = metrics
        self.options = tuple(options)
        self.publish_timeout = publish_timeout
        self.tls = tls or GrpcTls()
        self.down_after = down_after
        self.up_after = up_after
        self.links: dict[str, ShardLink] = {}
        # Links of shards that left the membership, kept until their
        # unsettled publishes are settled or follow their channels.
        self.retired: dict[str, ShardLink] = {}
        self.shards: tuple[str, ...] = ()
        self.ring: tuple[str, ...] = ()
        self._started = False
        self._monitor: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Future[None]] = set()
        self._add(shards)
        self.shards = tuple(sorted(shards))
        self.ring = self.shards
        metrics.known_shards.set(len(self.shards))
        metrics.ring_shards.set(len(self.ring))

    # -- membership and health ---------------------------------------------

    def _add(self, addresses: Iterable[str], *, pending: bool = False) -> None:
        """Open links to ``addresses``; with ``pending``, a new shard joins the
        ring only once it welcomed a stream (a pod listed before it serves
        must not hold channels meanwhile)."""
        for address in addresses:
            if address in self.links:
                continue
            link = self.retired.pop(address, None)
            if link is None:
                channel = open_channel(address, self.tls, options=self.options)
                link = ShardLink(
                    address,
                    self.edge_id,
                    channel,
                    self.local,
                    self.metrics,
                    publish_timeout=self.publish_timeout,
                    on_health=self._health_changed,
                )
                link.down = pending
            self.links[address] = link
            if self._started:
                link.ensure_started()

    def start(self) -> None:
        """Open a stream to every shard now: the edge must know which shards it
        can reach before a channel needs one, and readiness must not wait for
        the first client."""
        self._started = True
        for link in self.links.values():
            link.channel.get_state(try_to_connect=True)
            link.ensure_started()
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch(), name="ring-watch")

    warm_up = start

    def set_shards(self, shards: Sequence[str]) -> None:
        """The membership changed (a DNS answer): route over ``shards`` from now on."""
        new = tuple(sorted(set(shards)))
        if not new or new == self.shards:
            return
        gone = set(self.shards) - set(new)
        log.info(
            "shard membership changed",
            extra={"shards": list(new), "added": sorted(set(new) - set(self.shards))},
        )
        # Before start() nothing is routed yet: the first answer is the ring.
        self._add(new, pending=self._started)
        for address in gone:
            self.retired[address] = self.links.pop(address)
        self.shards = new
        self.metrics.known_shards.set(len(new))
        self._update("membership")

    def _health_changed(self, link: ShardLink) -> None:
        if link.down and link.settles and link.welcomes == 1:
            self.check_health(time.monotonic())  # a new shard: no need to wait for the tick
        elif link.draining and not link.down:
            link.down = True
            self._update("drain")
        elif not link.attached:
            # Publishes left with this link for channels routed elsewhere
            # now follow their channels.
            self._rehome(link)
        if link.draining and link.address not in self._ring_of(self.shards):
            self._release(link)

    async def _watch(self) -> None:
        tick = max(0.05, min(0.25, self.down_after / 10))
        while True:
            await asyncio.sleep(tick)
            self.check_health(time.monotonic())

    def check_health(self, now: float) -> None:
        """Mark shards down or back up by how long they were (un)reachable."""
        changed: list[str] = []
        failed_since: list[float] = []
        for link in self.links.values():
            if not link.down and not link.attached and now - link.broken_since >= self.down_after:
                link.down = True
                changed.append("down")
                failed_since.append(link.broken_since)
                log.warning(
                    "shard down: routing its channels elsewhere",
                    extra={"shard": link.address, "seconds": round(now - link.broken_since, 2)},
                )
            elif (
                link.down
                and link.settles
                and link.welcomed_at is not None
                # A shard never reached before (the edge started first) joins
                # at once; one that failed must stay reachable a while.
                and (link.welcomes == 1 or now - link.welcomed_at >= self.up_after)
            ):
                link.down = False
                link.draining = False
                changed.append("up")
                log.info("shard back: its channels return to it", extra={"shard": link.address})
        for reason in dict.fromkeys(changed):
            self._update(reason)
        done = time.monotonic()
        for since in failed_since:
            self.metrics.failover_seconds.observe(done - since)
        for address, link in list(self.retired.items()):
            if not link.inflight:
                del self.retired[address]
                task = asyncio.ensure_future(_close_link(link))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    # -- the ring ------------------------------------------------------------

    def _ring_of(self, shards: Sequence[str]) -> tuple[str, ...]:
        return tuple(a for a in shards if not self.links[a].down)

    def _owner(self, channel_id: str) -> str:
        # With every shard down, route over all of them: whichever comes back
        # first takes its channels again.
        return owner_of(channel_id, self.ring or self.shards)

    def _update(self, reason: str) -> None:
        ring = self._ring_of(self.shards)
        if ring == self.ring:
            return
        self.ring = ring
        self.metrics.ring_changes.labels(reason).inc()
        self.metrics.ring_shards.set(len(ring))
        moved = self._reroute()
        if moved:
            self.metrics.channels_moved.labels(reason).inc(moved)
        log.info(
            "ring changed",
            extra={"reason": reason, "ring": list(ring), "channels_moved": moved},
        )
        for link in [*self.links.values(), *self.retired.values()]:
            if link.draining and link.address not in ring:
                self._release(link)

    def _reroute(self) -> int:
        """Move every local connection whose channel's owner changed; return
        how many channels moved."""
        moved: set[str] = set()
        for link in [*self.links.values(), *self.retired.values()]:
            for conn in list(link.members.values()):
                owner = self._owner(conn.channel_id)
                if owner != link.address:
                    self._move(conn, link, self.links[owner])
                    moved.add(conn.channel_id)
            self._rehome(link)
        return len(moved)

    def _move(self, conn: Connection, old: ShardLink, new: ShardLink) -> None:
        del old.members[conn.id]
        future = old.joins.pop(conn.id, None)
        new.ensure_started()
        new.members[conn.id] = conn
        if future is not None:
            new.joins[conn.id] = future
        new._queue(new._join_event(conn, rejoin=future is None))
        if old.settles:
            # Release the connection at its old owner (it keeps no stale member).
            old._queue(
                channel_pb2.EdgeEvent(
                    leave=channel_pb2.Leave(conn_id=conn.id, channel_id=conn.channel_id, moved=True)
                )
            )

    def _rehome(self, link: ShardLink) -> None:
        """Unsettled publishes whose channel moved away follow it, unless the
        old owner can still settle them."""
        if link.settles or not link.inflight:
            return
        for key, (pub, deadline) in list(link.inflight.items()):
            owner = self._owner(pub.channel_id)
            if owner == link.address:
                continue
            del link.inflight[key]
            new = self.links[owner]
            new.inflight[key] = (pub, deadline)
            new._queue(channel_pb2.EdgeEvent(publish=pub))

    def _release(self, link: ShardLink) -> None:
        """A draining shard has nothing of ours left: end our stream so it can exit."""
        if not link.members and not link.inflight:
            link.end_stream()

    # -- routing ---------------------------------------------------------------

    def link_for(self, channel_id: str) -> ShardLink:
        return self.links[self._owner(channel_id)]

    def join(self, conn: Connection) -> asyncio.Future[channel_pb2.JoinResult]:
        return self.link_for(conn.channel_id).join(conn)

    def leave(self, conn: Connection) -> None:
        self._holder(conn).leave(conn)

    def publish(self, conn: Connection, pub: channel_pb2.Publish) -> None:
        self.link_for(conn.channel_id).publish(conn, pub)

    def typing(self, conn: Connection, is_typing: bool) -> None:
        self.link_for(conn.channel_id).typing(conn, is_typing)

    def presence(self, conn: Connection, status: str) -> None:
        self.link_for(conn.channel_id).presence(conn, status)

    def read(self, conn: Connection, seq: int) -> None:
        self.link_for(conn.channel_id).read(conn, seq)

    def _holder(self, conn: Connection) -> ShardLink:
        """The link that has ``conn`` registered (its owner's, but for a
        connection that never joined)."""
        for link in [*self.links.values(), *self.retired.values()]:
            if conn.id in link.members:
                return link
        return self.link_for(conn.channel_id)

    def ready(self) -> bool:
        """Every shard of the ring is reachable (connecting to any that is
        not yet); a shard that is down has left the ring."""
        links = [self.links[a] for a in self.ring]
        return bool(links) and all(
            link.channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY
            for link in links
        )

    def inflight(self) -> int:
        return sum(len(link.inflight) for link in [*self.links.values(), *self.retired.values()])

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for link in [*self.links.values(), *self.retired.values()]:
            await _close_link(link)


async def _close_link(link: ShardLink) -> None:
    await link.stop()
    await link.channel.close()
