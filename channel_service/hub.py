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
* Idle channels (no members, nothing pending) are evicted at once; they are
  rebuilt from the store and the edges' re-registrations on next use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from channel_service.channel import (
    Channel,
    ChannelPolicy,
    Conn,
    PendingPublish,
    refuse_publish,
)
from channel_service.metrics import ChannelMetrics
from waddle_common import wire
from waddle_common.store_client import StoreClient, StoreUnavailable, stored_to_body
from waddle_pb import channel_pb2, store_pb2

log = logging.getLogger("channel.hub")


@dataclass(frozen=True, slots=True)
class HubConfig:
    default_max_connections: int
    max_message_length: int
    policy: ChannelPolicy
    publish_timeout: float = 10.0
    rejoin_grace: float = 5.0
    retry_initial: float = 0.05
    retry_max: float = 1.0


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
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            if self.out:
                events, self.out = self.out, []
                yield channel_pb2.ShardBatch(events=events)

    def close(self) -> None:
        self.closed = True
        self.wake.set()


@dataclass(slots=True)
class _Loading:
    backlog: list[tuple[Session, channel_pb2.EdgeEvent]] = field(default_factory=list)


class Hub:
    def __init__(self, config: HubConfig, store: StoreClient, metrics: ChannelMetrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.channels: dict[str, Channel] = {}
        self._loading: dict[str, _Loading] = {}
        self._dirty: dict[str, Channel] = {}
        self._commit_wake = asyncio.Event()
        self._generation = 0
        self._seen_edges: set[str] = set()
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._committer: asyncio.Task[None] | None = None
        self._members = 0
        metrics.active_channels.set_function(lambda: len(self.channels))
        metrics.members.set_function(lambda: self._members)
        metrics.edge_streams.set_function(lambda: len(self.sessions))

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._committer = asyncio.create_task(self._commit_loop(), name="committer")

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            session.close()
        for handle in self._grace.values():
            handle.cancel()
        tasks = [*self._tasks, *([self._committer] if self._committer else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
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
        log.info("edge attached", extra={"edge_id": edge_id, "generation": session.generation})
        return session

    def close_session(self, session: Session) -> None:
        session.close()
        if self.sessions.get(session.edge_id) is session:
            del self.sessions[session.edge_id]
            self._schedule_drop(session.edge_id)
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
                self._maybe_evict(channel)
        self._members -= dropped
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
        sent = 0
        for edge_id in channel.edges:
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
                    )
                )
            )

    def join_result(self, edge_id: str, result: channel_pb2.JoinResult) -> None:
        session = self.sessions.get(edge_id)
        if session is not None:
            session.send(channel_pb2.ShardEvent(join_result=result))

    # -- inbound ------------------------------------------------------------

    def handle(self, session: Session, event: channel_pb2.EdgeEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind is None or kind == "hello":
            return
        channel_id: str = getattr(event, kind).channel_id
        channel = self.channels.get(channel_id)
        if channel is not None:
            self._apply(channel, session, event)
            return
        loading = self._loading.get(channel_id)
        if loading is not None:
            loading.backlog.append((session, event))
            return
        if kind in ("leave", "typing", "presence"):
            return  # nothing to act on in a channel nobody is in
        if kind == "publish":
            # A publish for a channel this shard does not hold: the sender is
            # not (or no longer) registered here.
            self._apply_unloaded_publish(session, event.publish)
            return
        self._loading[channel_id] = _Loading(backlog=[(session, event)])
        self._spawn(self._load(channel_id), name=f"load:{channel_id}")

    def _apply_unloaded_publish(self, session: Session, pub: channel_pb2.Publish) -> None:
        self.metrics.publishes.labels("refused").inc()
        refuse_publish(self, session.edge_id, pub.channel_id, pub, wire.NOT_JOINED)

    def _apply(self, channel: Channel, session: Session, event: channel_pb2.EdgeEvent) -> None:
        if session.closed:
            return
        edge_id = session.edge_id
        match event.WhichOneof("kind"):
            case "join":
                join = event.join
                m = join.member
                before = len(channel.conns)
                channel.join(
                    Conn(
                        edge_id=edge_id,
                        conn_id=join.conn_id,
                        user_id=m.user_id,
                        username=m.username,
                        avatar_url=m.avatar_url,
                        can_write="write" in m.permissions,
                        joined_at_ms=m.joined_at_ms,
                        status=m.status or "online",
                        session=session.generation,
                    ),
                    rejoin=join.rejoin,
                    emit=self,
                )
                self._members += len(channel.conns) - before
            case "leave":
                before = len(channel.conns)
                channel.leave(edge_id, event.leave.conn_id, self)
                self._members += len(channel.conns) - before
                self._maybe_evict(channel)
            case "typing":
                channel.set_typing(edge_id, event.typing.conn_id, event.typing.is_typing, self)
            case "presence":
                channel.set_presence(edge_id, event.presence.conn_id, event.presence.status, self)
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
                    self._maybe_evict(channel)
                else:
                    self._mark_dirty(channel)
            case _:
                pass

    def _maybe_evict(self, channel: Channel) -> None:
        if channel.idle and self.channels.get(channel.channel_id) is channel:
            del self.channels[channel.channel_id]

    async def _load(self, channel_id: str) -> None:
        delay = self.config.retry_initial
        while True:
            try:
                state = await self.store.load_channel(channel_id, self.config.policy.recent_limit)
            except StoreUnavailable as exc:
                log.warning(
                    "channel load failed", extra={"channel_id": channel_id, "error": str(exc)}
                )
                loading = self._loading[channel_id]
                loading.backlog = self._refuse_backlog(loading.backlog)
                if not loading.backlog:
                    del self._loading[channel_id]
                    return
                # Re-registrations must not be refused: keep trying.
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max)
                continue
            channel = Channel.from_state(
                state,
                default_max=self.config.default_max_connections,
                policy=self.config.policy,
            )
            self.channels[channel_id] = channel
            for session, event in self._loading.pop(channel_id).backlog:
                self._apply(channel, session, event)
            self._maybe_evict(channel)
            return

    def _refuse_backlog(
        self, backlog: list[tuple[Session, channel_pb2.EdgeEvent]]
    ) -> list[tuple[Session, channel_pb2.EdgeEvent]]:
        """Answer what cannot wait for the store; return the re-registrations."""
        keep: list[tuple[Session, channel_pb2.EdgeEvent]] = []
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
            work: list[tuple[Channel, list[PendingPublish]]] = []
            for channel in self._dirty.values():
                if channel.pending and not channel.committing:
                    channel.committing = True
                    work.append((channel, channel.take_pending()))
            self._dirty.clear()
            if not work:
                continue
            ok = await self._commit(work)
            for channel, _ in work:
                channel.committing = False
                if channel.pending:
                    self._mark_dirty(channel)
                self._maybe_evict(channel)
            if ok:
                delay = self.config.retry_initial
            else:
                # The store is down: wait before the next attempt so a dead
                # store is not hammered, but keep accepting publishes.
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max)

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
            # The store refused the batch as such (not a transient failure):
            # retrying the same messages cannot succeed. Validation upstream
            # should make this unreachable; settle the senders, never hang them.
            log.error(
                "store refused a group commit",
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
