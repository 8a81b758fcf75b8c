"""The shard's switchboard: Attach sessions in, channels in the middle,
one group committer out to the store.

Contract:
* Events of one channel are applied in arrival order. While a channel is
  being loaded from the store, its events wait in a backlog and are applied
  in order once it is loaded.
* Each session's outgoing events are written in the order they were
  emitted, batched: everything emitted while the previous batch was being
  written goes out as one ``ShardBatch``.
* One committer task persists every channel's queued publishes in one store
  call (group commit). A channel is never in two commits at once, so its
  sequence numbers are assigned, stored and broadcast strictly in order.
* A session that ends leaves its connections registered for a grace period,
  so an edge that re-attaches and re-registers them causes no presence
  flapping; whatever it did not re-register is removed after the grace.
* Which channels are in memory, loading, asleep or waking is the
  lifecycle's (``channel_service.lifecycle``): channels with no members are
  forgotten at once, idle channels with members hibernate, and any event
  wakes them, invisibly to clients.
* The presence linger (``presence.Linger``) and read cursors
  (``receipts.ReadReceipts``: batched store writes, coalesced receipts) are
  separate parts the hub wires to its channels; each runs one timer or task
  for the whole shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from channel_service.channel import (
    Channel,
    ChannelPolicy,
    Conn,
    Emitter,
    PendingPublish,
    refuse_publish,
)
from channel_service.lifecycle import Backlog, Lifecycle, LifecycleConfig
from channel_service.metrics import ChannelMetrics
from channel_service.presence import Linger
from channel_service.receipts import CursorWriter, ReadReceipts
from waddle_common import wire
from waddle_common.store_client import StoreClient, StoreUnavailable, stored_to_body
from waddle_pb import channel_pb2, store_pb2

log = logging.getLogger("channel.hub")

# What a draining shard no longer takes (and does not answer): the edges
# re-send these to the channels' next owners.
_NOT_WHILE_DRAINING = frozenset({"publish", "join"})


@dataclass(frozen=True, slots=True)
class HubConfig:
    default_max_connections: int
    max_message_length: int
    policy: ChannelPolicy
    publish_timeout: float = 10.0
    rejoin_grace: float = 5.0
    retry_initial: float = 0.05
    retry_max: float = 1.0
    receipt_interval: float = 1.0  # at most one read receipt per user and channel this often
    idle_seconds: float = 0.0  # hibernate channels idle this long (0: never)
    rehydrate_timeout: float = 5.0
    background_concurrency: int = 8


# Largest batch written to one Attach stream at once (gRPC's limit is 16 MiB).
MAX_BATCH_BYTES = 4 * 1024 * 1024


@dataclass(eq=False)
class Session:
    """One edge's Attach stream, as seen from the shard."""

    edge_id: str
    generation: int
    out: list[channel_pb2.ShardEvent] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def send(self, event: channel_pb2.ShardEvent) -> None:
        if self.closed:
            return
        self.out.append(event)
        self.wake.set()

    async def batches(self) -> AsyncIterator[channel_pb2.ShardBatch]:
        """Everything queued since the previous batch, in order, in batches of
        at most ``MAX_BATCH_BYTES`` (far below gRPC's message limit, however
        long the reader was slow)."""
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            while self.out:
                size = 0
                for n, event in enumerate(self.out):
                    size += event.ByteSize()
                    if size > MAX_BATCH_BYTES and n:
                        break
                else:
                    n = len(self.out)
                events, self.out = self.out[:n], self.out[n:]
                # Nothing of a sent batch stays referenced while waiting.
                yield channel_pb2.ShardBatch(events=events)
                del events

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class Hub:
    def __init__(self, config: HubConfig, store: StoreClient, metrics: ChannelMetrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.life = Lifecycle(
            self,
            store,
            metrics,
            config=LifecycleConfig(
                idle_seconds=config.idle_seconds,
                rehydrate_timeout=config.rehydrate_timeout,
                background_concurrency=config.background_concurrency,
                retry_initial=config.retry_initial,
                retry_max=config.retry_max,
            ),
            policy=config.policy,
            default_max_connections=config.default_max_connections,
        )
        self._dirty: dict[str, Channel] = {}
        self._commit_wake = asyncio.Event()
        self._generation = 0
        self._seen_edges: set[str] = set()
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._committer: asyncio.Task[None] | None = None
        # Set by the shard drain (``channel_service.drain``): publishes and
        # joins are no longer taken, and left unanswered for the next owner.
        self.draining = False
        self._head_checks: set[str] = set()
        self.departures = Linger(config.policy.presence_linger, self._linger_expired)
        self.reads = ReadReceipts(
            CursorWriter(
                store,
                metrics,
                stored=self._cursors_stored,
                retry_initial=config.retry_initial,
                retry_max=config.retry_max,
            ),
            self._announce_read,
            interval=config.receipt_interval,
        )
        metrics.active_channels.set_function(lambda: len(self.life.channels))
        metrics.hibernated_channels.set_function(lambda: len(self.life.sleeping))
        metrics.members.set_function(self.life.members)
        metrics.edge_streams.set_function(lambda: len(self.sessions))

    @property
    def channels(self) -> dict[str, Channel]:
        """The awake channels."""
        return self.life.channels

    # -- start and stop -----------------------------------------------------

    def start(self) -> None:
        self._committer = asyncio.create_task(self._commit_loop(), name="committer")
        self.reads.start()
        self.life.start()

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            session.close()
        for handle in self._grace.values():
            handle.cancel()
        self.departures.stop()
        self.life.stop()
        tasks = [*self._tasks, *([self._committer] if self._committer else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.reads.stop()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sessions -----------------------------------------------------------

    def open_session(self, edge_id: str) -> Session:
        self._generation += 1
        session = Session(edge_id=edge_id, generation=self._generation)
        previous = self.sessions.get(edge_id)
        if previous is not None:
            previous.close()
        self.sessions[edge_id] = session
        if edge_id in self._seen_edges:
            self.metrics.stream_reconnects.inc()
        self._seen_edges.add(edge_id)
        handle = self._grace.pop(edge_id, None)
        if handle is not None:
            handle.cancel()
        # Whatever the previous stream registered and this one does not
        # re-register within the grace period is gone.
        if previous is not None or handle is not None:
            self._schedule_drop(edge_id)
        if previous is not None:
            self.life.session_ended(edge_id)
        log.info("edge attached", extra={"edge_id": edge_id, "generation": session.generation})
        return session

    def close_session(self, session: Session) -> None:
        session.close()
        if self.sessions.get(session.edge_id) is session:
            del self.sessions[session.edge_id]
            self._schedule_drop(session.edge_id)
            self.life.session_ended(session.edge_id)
        log.info("edge detached", extra={"edge_id": session.edge_id})

    def _schedule_drop(self, edge_id: str) -> None:
        old = self._grace.pop(edge_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._grace[edge_id] = loop.call_later(self.config.rejoin_grace, self._drop_stale, edge_id)

    def _drop_stale(self, edge_id: str) -> None:
        self._grace.pop(edge_id, None)
        current = self.sessions.get(edge_id)
        keep = current.generation if current is not None else None
        dropped = 0
        for channel in list(self.channels.values()):
            if edge_id in channel.edges:
                dropped += channel.drop_session(edge_id, keep, self)
                self.evict_if_idle(channel)
        self.life.edge_stale(edge_id, keep)
        if dropped:
            log.info(
                "dropped connections of a departed edge",
                extra={"edge_id": edge_id, "count": dropped},
            )

    # -- Emitter ------------------------------------------------------------

    def broadcast(
        self,
        channel: Channel,
        payload: bytes,
        *,
        frame_type: str,
        seq: int = 0,
        exclude_user_id: str = "",
        received_at_ns: int = 0,
        ephemeral: bool = False,
    ) -> None:
        event = channel_pb2.ShardEvent(
            deliver=channel_pb2.Deliver(
                channel_id=channel.channel_id,
                payload=payload,
                seq=seq,
                exclude_user_id=exclude_user_id,
                received_at_ns=received_at_ns,
                ephemeral=ephemeral,
                type=frame_type,
            )
        )
        self._to_edges(channel.edges, event)

    def _to_edges(self, edge_ids: Iterable[str], event: channel_pb2.ShardEvent) -> None:
        sent = 0
        for edge_id in edge_ids:
            session = self.sessions.get(edge_id)
            if session is not None:
                session.send(event)
                sent += 1
        if sent:
            self.metrics.broadcast_edges.observe(sent)

    def reply(
        self,
        edge_id: str,
        conn_id: int,
        channel_id: str,
        payload: bytes,
        *,
        client_msg_id: str = "",
        final: bool = False,
        frame_type: str = "",
    ) -> None:
        session = self.sessions.get(edge_id)
        if session is not None:
            session.send(
                channel_pb2.ShardEvent(
                    reply=channel_pb2.Reply(
                        conn_id=conn_id,
                        channel_id=channel_id,
                        payload=payload,
                        client_msg_id=client_msg_id,
                        final=final,
                        type=frame_type,
                    )
                )
            )

    def join_result(self, edge_id: str, result: channel_pb2.JoinResult) -> None:
        session = self.sessions.get(edge_id)
        if session is not None:
            # Field by field: ``ShardEvent(join_result=result)`` deep-copies
            # the message, ten times slower for an ``initial_state`` listing
            # a thousand users (~170 against ~17 us), once per join.
            # (``JoinResult`` has scalar fields only.)
            event = channel_pb2.ShardEvent()
            out = event.join_result
            out.SetInParent()
            for field, value in result.ListFields():
                setattr(out, field.name, value)
            session.send(event)

    def linger(self, channel: Channel, user_id: str) -> None:
        self.departures.depart(channel.channel_id, user_id)

    def cursor_moved(self, channel: Channel, user_id: str, seq: int) -> None:
        self.reads.moved(channel.channel_id, user_id, seq, receipt=channel.announces_presence())

    # -- presence linger and read receipts ------------------------------------

    def _linger_expired(self, channel_id: str, user_id: str) -> None:
        channel = self.channels.get(channel_id)
        if channel is not None and channel.linger_expired(user_id, self):
            self.metrics.linger_expirations.inc()

    def _announce_read(self, channel_id: str, user_id: str, seq: int) -> None:
        """Broadcast a (coalesced) read receipt to the channel's other members
        (a channel that fell asleep meanwhile: to the edges of its record)."""
        channel = self.channels.get(channel_id)
        if channel is not None:
            if not channel.announces_presence():
                return
            edge_ids: Iterable[str] = channel.edges
        else:
            record = self.life.sleeping.get(channel_id)
            if record is None:
                return
            if sum(share.count for share in record) > self.config.policy.presence_fanout_limit:
                return
            edge_ids = [share.edge_id for share in record]
        self._to_edges(
            edge_ids,
            channel_pb2.ShardEvent(
                deliver=channel_pb2.Deliver(
                    channel_id=channel_id,
                    payload=wire.read_frame(channel_id=channel_id, user_id=user_id, seq=seq),
                    exclude_user_id=user_id,
                    ephemeral=True,
                    type="read",
                )
            ),
        )
        self.metrics.read_receipts.inc()

    def _cursors_stored(self, cursors: list[store_pb2.ReadCursor]) -> None:
        for cursor in cursors:
            channel = self.channels.get(cursor.channel_id)
            if channel is not None:
                channel.stored_cursor(cursor.user_id, cursor.seq)

    # -- inbound ------------------------------------------------------------

    def handle(self, session: Session, event: channel_pb2.EdgeEvent) -> None:
        kind = event.WhichOneof("kind")
        if self.draining and kind in _NOT_WHILE_DRAINING:
            return
        self.life.route(session, event)

    def settling(self) -> bool:
        """Some publish taken is not settled yet (queued, committing, or
        waiting in the backlog of a channel being loaded)."""
        if self.life.waking:
            return True
        return any(c.pending or c.committing for c in self.channels.values())

    # -- what the lifecycle needs (``lifecycle.Host``) ----------------------

    def session(self, edge_id: str) -> Session | None:
        return self.sessions.get(edge_id)

    def grace_pending(self, edge_id: str) -> bool:
        return edge_id in self._grace

    def refuse_unloaded_publish(self, session: Session, pub: channel_pb2.Publish) -> None:
        self.metrics.publishes.labels("refused").inc()
        refuse_publish(self, session.edge_id, pub.channel_id, pub, wire.NOT_JOINED)

    def channel_asleep(self, channel_id: str) -> None:
        # Receipts already sent name the channel until their interval is over;
        # let go of those now rather than at the shard's next receipt.
        self.reads.coalescer.forget_old(time.monotonic())

    def evict_if_idle(self, channel: Channel) -> None:
        if channel.idle and self.channels.get(channel.channel_id) is channel:
            del self.channels[channel.channel_id]
            self.life.forgotten(channel)

    def rejoin(self, channel: Channel, session: Session, join: channel_pb2.Join) -> None:
        if not session.closed:
            self._join(channel, session, join, rejoin=True)

    def _join(
        self, channel: Channel, session: Session, join: channel_pb2.Join, *, rejoin: bool
    ) -> None:
        if join.seen_seq > channel.last_seq:
            # The connection saw messages this owner did not commit: another
            # owner did, while the edges disagreed. Learn the store's head.
            self._check_head(channel)
        m = join.member
        channel.join(
            Conn(
                edge_id=session.edge_id,
                conn_id=join.conn_id,
                user_id=m.user_id,
                username=m.username,
                avatar_url=m.avatar_url,
                can_write="write" in m.permissions,
                joined_at_ms=m.joined_at_ms,
                status=m.status or "online",
                session=session.generation,
            ),
            rejoin=rejoin,
            emit=self,
        )

    def apply(self, channel: Channel, session: Session, event: channel_pb2.EdgeEvent) -> None:
        if session.closed:
            return
        if self.draining and event.WhichOneof("kind") in _NOT_WHILE_DRAINING:
            return  # from a backlog: the edge re-sends it to the next owner
        channel.active_at = time.monotonic()
        edge_id = session.edge_id
        match event.WhichOneof("kind"):
            case "join":
                self._join(channel, session, event.join, rejoin=event.join.rejoin)
            case "leave":
                if event.leave.moved:
                    release(channel, edge_id, event.leave.conn_id)
                else:
                    channel.leave(edge_id, event.leave.conn_id, self)
                self.evict_if_idle(channel)
            case "typing":
                channel.set_typing(edge_id, event.typing.conn_id, event.typing.is_typing, self)
            case "presence":
                channel.set_presence(edge_id, event.presence.conn_id, event.presence.status, self)
            case "read":
                channel.read(edge_id, event.read.conn_id, event.read.seq, self)
            case "publish":
                pending = channel.publish(
                    edge_id,
                    event.publish,
                    max_length=self.config.max_message_length,
                    deadline=time.monotonic() + self.config.publish_timeout,
                    emit=self,
                )
                if pending is None:
                    self.metrics.publishes.labels("refused").inc()
                    self.evict_if_idle(channel)
                else:
                    self._mark_dirty(channel)
            case _:
                pass

    def refuse_backlog(self, backlog: Backlog) -> Backlog:
        """Answer what cannot wait for the store; return the re-registrations."""
        keep: Backlog = []
        for session, event in backlog:
            kind = event.WhichOneof("kind")
            if kind == "join" and event.join.rejoin:
                keep.append((session, event))
            elif kind == "join":
                self.join_result(
                    session.edge_id,
                    channel_pb2.JoinResult(
                        conn_id=event.join.conn_id,
                        channel_id=event.join.channel_id,
                        ok=False,
                        refusal="unavailable",
                    ),
                )
            elif kind == "publish":
                pub = event.publish
                self.metrics.publishes.labels("unavailable").inc()
                refuse_publish(self, session.edge_id, pub.channel_id, pub, wire.UNAVAILABLE)
        return keep

    def _check_head(self, channel: Channel) -> None:
        if channel.channel_id not in self._head_checks:
            self._head_checks.add(channel.channel_id)
            self.spawn(self._head_check(channel), f"head:{channel.channel_id}")

    async def _head_check(self, channel: Channel) -> None:
        """Broadcast what another owner committed for ``channel`` while the
        edges disagreed, so its members need no publish here to see it."""
        try:
            state = await self.store.load_channel(channel.channel_id, 0)
            # A commit in flight settles it: it lands (so nothing was missed)
            # or it is fenced and the committer catches up.
            if (
                not channel.committing
                and self.channels.get(channel.channel_id) is channel
                and state.last_seq > channel.last_seq
            ):
                # Keep the committer off this channel until it caught up.
                channel.committing = True
                try:
                    await self._catch_up(channel, state.last_seq)
                finally:
                    channel.committing = False
                    if channel.pending:
                        self._mark_dirty(channel)
        except StoreUnavailable:
            pass  # the next commit's fence catches up instead
        finally:
            self._head_checks.discard(channel.channel_id)

    # -- group commit -------------------------------------------------------

    def _mark_dirty(self, channel: Channel) -> None:
        self._dirty[channel.channel_id] = channel
        self._commit_wake.set()

    async def _commit_loop(self) -> None:
        """Run commits forever: an unexpected error is logged, never fatal."""
        while True:
            try:
                await self._commit_rounds()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("committer error; continuing")
                await asyncio.sleep(self.config.retry_max)
                self._commit_wake.set()

    async def _commit_rounds(self) -> None:
        delay = self.config.retry_initial
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            ok = await self._commit_round()
            if ok is None or ok:
                delay = self.config.retry_initial
            else:
                # The store is down: wait before the next attempt so a dead
                # store is not hammered, but keep accepting publishes.
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max)

    async def _commit_round(self) -> bool | None:
        """Commit every dirty channel's queue once; None when there was nothing.

        A method of its own so that nothing of a round (its channels, their
        messages) stays referenced by the committer while it waits for the
        next one: that would keep a channel that went to sleep in memory."""
        work: list[tuple[Channel, list[PendingPublish]]] = []
        for channel in self._dirty.values():
            if channel.pending and not channel.committing:
                channel.committing = True
                work.append((channel, channel.take_pending()))
        self._dirty.clear()
        if not work:
            return None
        ok = await self._commit(work)
        for channel, _ in work:
            channel.committing = False
            if channel.pending:
                self._mark_dirty(channel)
            self.evict_if_idle(channel)
        return ok

    async def _commit(self, work: list[tuple[Channel, list[PendingPublish]]]) -> bool:
        request = store_pb2.AppendBatchRequest(
            channels=[
                store_pb2.ChannelAppend(
                    channel_id=channel.channel_id,
                    expected_last_seq=channel.last_seq,
                    messages=[p.message for p in pendings],
                )
                for channel, pendings in work
            ]
        )
        started = time.perf_counter()
        try:
            response = await self.store.append_batch(request)
        except StoreUnavailable as exc:
            log.warning("group commit failed", extra={"error": str(exc), "channels": len(work)})
            self._requeue_or_fail(work)
            return False
        except grpc.aio.AioRpcError as exc:
            # The store refused the request as such: retrying the same
            # messages together cannot succeed. Split it until the refused
            # message stands alone, so it never takes the others with it.
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT and _messages(work) > 1:
                return await self._isolate(work)
            log.error(
                "store refused a commit",
                extra={"code": exc.code().name, "details": exc.details(), "channels": len(work)},
            )
            for channel, pendings in work:
                self.metrics.publishes.labels("refused").inc(len(pendings))
                for pending in pendings:
                    refuse_publish(
                        self, pending.edge_id, channel.channel_id, pending, wire.REJECTED
                    )
            return True
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.commit_batch.observe(sum(len(p) for _, p in work))
        by_channel = {r.channel_id: r for r in response.channels}
        for channel, pendings in work:
            result = by_channel.get(channel.channel_id)
            if result is None:
                self._requeue_or_fail([(channel, pendings)])
            elif result.status == store_pb2.ChannelAppendResult.FENCED:
                await self._catch_up(channel, result.last_seq)
                channel.pending[:0] = pendings
            else:
                for r in result.results:
                    self.metrics.publishes.labels("duplicate" if r.duplicate else "ok").inc()
                channel.committed(pendings, result.results, result.last_seq, self)
        return True

    async def _isolate(self, work: list[tuple[Channel, list[PendingPublish]]]) -> bool:
        """Commit ``work`` in two halves, each split again while refused.

        Halves of different channels are independent. Halves of one channel
        keep its order: the second goes only once the first is settled, and
        is queued behind it when the first was put back (fenced, or the
        store became unavailable)."""
        self.metrics.commit_splits.inc()
        if len(work) > 1:
            mid = len(work) // 2
            first = await self._commit(work[:mid])
            return await self._commit(work[mid:]) and first
        [(channel, pendings)] = work
        mid = len(pendings) // 2
        head, tail = pendings[:mid], pendings[mid:]
        ok = await self._commit([(channel, head)])
        waiting = {id(p) for p in head}
        put_back = sum(1 for p in channel.pending if id(p) in waiting)  # at the front
        if put_back:
            channel.pending[put_back:put_back] = tail
            return ok
        return await self._commit([(channel, tail)]) and ok

    def _requeue_or_fail(self, work: list[tuple[Channel, list[PendingPublish]]]) -> None:
        now = time.monotonic()
        for channel, pendings in work:
            late = [p for p in pendings if p.deadline <= now]
            keep = [p for p in pendings if p.deadline > now]
            if late:
                self.metrics.publishes.labels("unavailable").inc(len(late))
                channel.fail_pending(late, self)
            channel.pending[:0] = keep

    async def _catch_up(self, channel: Channel, store_head: int) -> None:
        """The store's head moved past ours (another owner wrote, or a commit
        whose answer we lost went through). Broadcast what we missed, then
        continue from the store's head."""
        log.warning(
            "append fenced; catching up",
            extra={"channel_id": channel.channel_id, "ours": channel.last_seq, "store": store_head},
        )
        after = channel.last_seq
        try:
            while after < store_head:
                page = await self.store.messages_after(
                    channel.channel_id, after_seq=after, limit=500
                )
                for m in page.messages:
                    channel.broadcast_stored(stored_to_body(m), received_at_ns=0, emit=self)
                    after = m.seq
                if not page.has_more:
                    break
        except StoreUnavailable:
            pass
        channel.last_seq = max(channel.last_seq, store_head)


class _Muted:
    """An emitter that tells nobody anything."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


_MUTED = cast(Emitter, _Muted())


def release(channel: Channel, edge_id: str, conn_id: int) -> None:
    """Forget a connection whose channel moved to another owner, silently: its
    user lives on at the new owner, so here it neither lingers nor departs."""
    conn = channel.conns.get((edge_id, conn_id))
    if conn is None:
        return
    channel.leave(edge_id, conn_id, _MUTED)
    user = channel.users.get(conn.user_id)
    if user is not None and not user.conns:
        del channel.users[conn.user_id]
        channel.cursors.pop(conn.user_id, None)


def _messages(work: list[tuple[Channel, list[PendingPublish]]]) -> int:
    return sum(len(pendings) for _, pendings in work)
