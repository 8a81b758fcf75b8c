"""Local client connections and the fan-out hot path.

A ``Connection`` is the edge's attachment for one WebSocket: who the user
is, which channel, and the delivery cursor that gives a client every
sequence number exactly once and in order. ``LocalChannels`` indexes the
connections of this edge by channel and turns one ``Deliver`` from a shard
into one pre-built frame written to every local socket.

Delivery rule for sequenced messages (``seq > 0``) on one connection:
``seq <= cursor`` is a duplicate and dropped; ``seq == cursor + 1`` is
written; a larger seq means something was missed, so the frame is held and
the gap is filled from the store first. While the connection is joining or
replaying, sequenced frames are held back and released in order afterwards.

Writes are corked: a socket collects its frames and gets them in one write
when the cork is flushed, right after the current loop turn - or, while the
edge keeps writing to big channels, no sooner than ``write_interval`` (20 ms
by default) after the last flush ended, so a loaded edge makes one system
call per socket per interval, carrying every frame of it, instead of one per
frame per socket. A smaller flush holds the next back by its share of
``FULL_FLUSH_SOCKETS`` (``Cork``). Only what a socket leaves unsent counts
against its bounded outgoing buffer (``send_buffer_bytes``): over it an ephemeral frame
(typing, presence) is dropped and a chat message closes the socket with
1013, so one slow phone never delays the others.

Joins and leaves (``user_connected``, ``user_disconnected``) for per-channel
sockets wait up to ``PRESENCE_WINDOW`` in a batch per channel, and then go
out as one chunk built once for every member (multiplexed sockets get a
``presence_diff`` instead, ``edge.presence_diff``). A crowd joining one
channel so costs one pass over its members per window instead of one per
join. The frames are the same frames, in the same order: anything else for
a member (a message, typing, a reply, a frame from the edge itself) sends
the batch first, and a member that goes live while a batch waits gets only
what came after its ``initial_state``, so every socket gets what it would
have got unbatched. "After" counts from the owner's answer to the join
(``LocalChannels.answered``), not from the socket going live: joins and
leaves that arrive in between wait for the socket and follow its
``initial_state``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from edge import presence_diff
from edge.auth import Identity
from edge.metrics import EdgeMetrics
from edge.presence_diff import PresenceCoalescer
from edge.protocol import Sync
from edge.upgraded import EdgeSocket
from edge.wsframe import text_frame
from waddle_common import wire
from waddle_pb import channel_pb2

log = logging.getLogger("edge.connection")


class State(enum.Enum):
    JOINING = "joining"  # waiting for the owner's JoinResult / the upgrade
    LIVE = "live"
    SYNCING = "syncing"  # replaying from the store; live messages held back
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Limits:
    send_buffer_bytes: int = 1 << 20
    max_held: int = 10_000


Scheduler = Callable[[float, Callable[[], None]], object]

PRESENCE_WINDOW = 0.05
"""Seconds a per-channel socket's joins and leaves may wait to share a write."""


def loop_scheduler(delay: float, callback: Callable[[], None]) -> object:
    loop = asyncio.get_running_loop()
    return loop.call_soon(callback) if delay <= 0 else loop.call_later(delay, callback)


FULL_FLUSH_SOCKETS = 256
"""Sockets a flush writes to for the whole write interval to follow it."""


class Cork:
    """Shared by an edge's connections: collects writes until the next flush.

    A flush runs right after the current loop turn, but no sooner than the
    hold of the previous flush: ``interval`` seconds after it ended when it
    wrote to ``full_at`` sockets or more, and that share of the interval
    when it wrote to fewer. Sparse traffic waits for nothing; a big
    channel's steady stream of deliveries is flushed every ``interval``, so
    each socket gets every frame of that interval in one write. The system
    call per socket per write is most of the edge's cost per delivery: once
    a big channel's messages come faster than the interval plus a flush,
    this divides it by the frames each write now carries, for at most
    ``interval`` more latency. A small flush (one socket's ack, a small
    channel's message) holds back almost nothing, so a big channel's
    delivery right after it is not made to wait a whole interval for it:
    with an unscaled 20 ms hold, a thousand-member channel at 10 msg/s had
    twice the all-members p99 (docs/performance.md).
    A flush that itself takes longer than its hold (thousands of sockets)
    delays the next by no more than the hold's rest.
    """

    def __init__(
        self,
        schedule: Scheduler = loop_scheduler,
        interval: float = 0.02,
        full_at: int = FULL_FLUSH_SOCKETS,
    ) -> None:
        self._schedule = schedule
        self.interval = interval
        self.full_at = full_at
        self.dirty: list[Connection] = []
        self.scheduled = False
        # Channels with joins and leaves waiting (``LocalChannels``), and how
        # to send them: a frame for one connection must not overtake them.
        self.presence_waiting: Mapping[str, object] = {}
        self.flush_presence: Callable[[str], None] = lambda channel_id: None
        self.next_at = -1e9  # perf_counter() before which no flush runs

    def add(self, conn: Connection) -> None:
        self.dirty.append(conn)
        if not self.scheduled:
            self.scheduled = True
            wait = self.next_at - time.perf_counter()
            self._schedule(wait if wait > 0 else 0.0, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()
        hold = self.interval * min(1.0, len(dirty) / self.full_at)
        self.next_at = time.perf_counter() + hold


@dataclass(eq=False, slots=True)
class Connection:
    id: int
    channel_id: str
    identity: Identity
    joined_at_ms: int
    status: str = "online"
    state: State = State.JOINING
    ws: EdgeSocket | None = None
    transport: asyncio.Transport | None = None
    cursor: int = 0  # highest seq delivered; (floor, cursor] all went out
    floor: int = 0
    # Frames held back (while joining, replaying or filling a gap) and frames
    # corked for the next flush; None while empty, so an idle connection
    # holds no list.
    held: list[tuple[int, bytes]] | None = None
    sync_task: asyncio.Task[None] | None = None
    queued_sync: Sync | None = None
    close_code: int | None = None
    close_reason: str = ""
    cork: Cork | None = None
    pending: list[bytes] | None = None
    multiplexed: bool = False  # a v1.1 subscription: joins and leaves come as presence_diff
    # The owner's JoinResult arrived (``LocalChannels.answered``): joins and
    # leaves from then on are after its initial_state, and those that come
    # before it goes live wait in ``presence_held``.
    answered: bool = False
    presence_held: list[bytes] | None = None

    def write(self, frame: bytes, metrics: EdgeMetrics, limits: Limits, *, ephemeral: bool) -> bool:
        """Write one pre-built frame; apply the slow-consumer policy."""
        transport = self.transport
        if transport is None or self.state is State.CLOSED or transport.is_closing():
            return False
        # Only what earlier ticks left unsent counts: a burst corked into this
        # tick is handed to the kernel at once and says nothing about the peer.
        if transport.get_write_buffer_size() > limits.send_buffer_bytes:
            if ephemeral:
                return False
            metrics.slow_consumer_closes.inc()
            log.info(
                "slow consumer closed",
                extra={"channel_id": self.channel_id, "user_id": self.identity.user_id},
            )
            self.close(wire.CLOSE_TRY_AGAIN, "slow consumer")
            return False
        cork = self.cork
        if cork is None:
            transport.write(frame)
        else:
            if self.pending is None:
                self.pending = [frame]
                cork.add(self)
            else:
                self.pending.append(frame)
        return True

    def flush(self) -> None:
        # Frames queued before a close (e.g. the error that led to a 1008) still
        # go out ahead of the close frame; a closing transport takes nothing.
        frames, self.pending = self.pending, None
        transport = self.transport
        if frames and transport is not None and not transport.is_closing():
            transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def drained(self) -> None:
        """Return once the socket's write buffer is below the transport's
        high-water mark; raise ``ConnectionError`` when the socket is gone."""
        ws = self.ws
        if ws is None:
            raise ConnectionError("connection closed")
        await ws.drained()

    def send(self, payload: bytes, metrics: EdgeMetrics, limits: Limits, frame_type: str) -> None:
        """A frame for this connection alone (ack, error, pong, replay)."""
        cork = self.cork
        if (
            cork is not None
            and self.channel_id in cork.presence_waiting
            and not self.multiplexed
            and (self.state is State.LIVE or self.state is State.SYNCING)
        ):
            cork.flush_presence(self.channel_id)  # what came before goes first
        if self.write(text_frame(payload), metrics, limits, ephemeral=False):
            metrics.frames_out_for(frame_type).inc()

    def close(self, code: int, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        # What was corked before the close (the errors that led to a 1008,
        # say) goes out ahead of the close frame.
        self.flush()
        self.state = State.CLOSED
        self.close_code, self.close_reason = code, reason
        if self.ws is not None:
            self.ws.close(code, reason)


@dataclass(slots=True)
class _PresenceBatch:
    """One channel's joins and leaves waiting for per-channel sockets."""

    frames: list[bytes] = field(default_factory=list)  # framed, in arrival order
    types: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # the user each frame is not for
    ephemeral: bool = True
    # Members that went live while the batch waited: conn id -> the first
    # frame meant for them (the earlier ones were in their initial_state).
    late: dict[int, int] = field(default_factory=dict)


class LocalChannels:
    """This edge's connections, by channel and by id, and the fan-out."""

    def __init__(
        self,
        metrics: EdgeMetrics,
        limits: Limits,
        schedule: Scheduler = loop_scheduler,
        write_interval: float = 0.02,
    ) -> None:
        self.metrics = metrics
        self.limits = limits
        self.by_channel: dict[str, dict[int, Connection]] = {}
        self.by_id: dict[int, Connection] = {}
        self.per_user: dict[str, int] = {}  # open connections of each user, all channels
        self.on_gap: Callable[[Connection], None] = lambda conn: None
        self.cork = Cork(schedule, write_interval)
        self.presence = PresenceCoalescer(self._write_diff)
        self._schedule = schedule
        self._batches: dict[str, _PresenceBatch] = {}
        self.cork.presence_waiting = self._batches
        self.cork.flush_presence = self.flush_presence

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, conn: Connection) -> None:
        conn.cork = self.cork
        self.by_id[conn.id] = conn
        self.by_channel.setdefault(conn.channel_id, {})[conn.id] = conn
        self.hold_user(conn.identity.user_id)

    def hold_user(self, user_id: str) -> None:
        """Count one more connection (or multiplexed socket) of ``user_id``."""
        self.per_user[user_id] = self.per_user.get(user_id, 0) + 1

    def release_user(self, user_id: str) -> None:
        left = self.per_user[user_id] - 1
        if left:
            self.per_user[user_id] = left
        else:
            del self.per_user[user_id]

    def remove(self, conn: Connection) -> None:
        if self.by_id.pop(conn.id, None) is None:
            return
        self.release_user(conn.identity.user_id)
        members = self.by_channel.get(conn.channel_id)
        if members is not None:
            members.pop(conn.id, None)
            if not members:
                del self.by_channel[conn.channel_id]

    # -- from the shard -----------------------------------------------------

    def deliver(self, d: channel_pb2.Deliver) -> None:
        members = self.by_channel.get(d.channel_id)
        if not members:
            return
        frame = text_frame(d.payload)
        seq = d.seq
        exclude = d.exclude_user_id
        if seq == 0 and d.type in presence_diff.TYPES:
            self._presence_frame(d, members, frame)
            return
        if d.channel_id in self._batches:
            self.flush_presence(d.channel_id)  # what came before goes first
        metrics, limits = self.metrics, self.limits
        written = 0
        if seq == 0:
            dropped = 0
            for conn in members.values():
                if exclude and conn.identity.user_id == exclude:
                    continue
                if conn.state is State.LIVE or conn.state is State.SYNCING:
                    if conn.write(frame, metrics, limits, ephemeral=d.ephemeral):
                        written += 1
                    else:
                        dropped += 1
            if dropped:
                metrics.dropped_frames.labels(d.type or "ephemeral").inc(dropped)
        else:
            # No copy of the members: nothing below removes a connection now
            # (closing and gap filling only schedule work for later).
            for conn in members.values():
                if exclude and conn.identity.user_id == exclude:
                    continue
                if conn.state is not State.LIVE:
                    self.hold(conn, seq, d.payload)
                elif seq == conn.cursor + 1:
                    if conn.write(frame, metrics, limits, ephemeral=False):
                        written += 1
                    conn.cursor = seq
                elif seq > conn.cursor:
                    self.hold(conn, seq, d.payload)
                    conn.state = State.SYNCING
                    self.on_gap(conn)
            if d.received_at_ns and written:
                metrics.fanout_latency.observe(max(0, time.time_ns() - d.received_at_ns) / 1e9)
        if written:
            metrics.frames_out_for(d.type or "message").inc(written)

    def _presence_frame(
        self, d: channel_pb2.Deliver, members: dict[int, Connection], frame: bytes
    ) -> None:
        """A join or leave: into the channel's ``presence_diff`` for its
        multiplexed members, into its batch for the others."""
        multiplexed = per_channel = False
        for conn in members.values():
            if conn.multiplexed:
                multiplexed = True
            else:
                per_channel = True
            if multiplexed and per_channel:
                break
        if multiplexed:
            self.presence.add(d.channel_id, d.type, d.payload)
        if not per_channel:
            return
        batch = self._batches.get(d.channel_id)
        first = batch is None
        if batch is None:
            batch = self._batches[d.channel_id] = _PresenceBatch()
        batch.frames.append(frame)
        batch.types.append(d.type)
        batch.excluded.append(d.exclude_user_id)
        batch.ephemeral = batch.ephemeral and d.ephemeral
        if first:
            channel_id = d.channel_id
            self._schedule(PRESENCE_WINDOW, lambda: self.flush_presence(channel_id))

    def flush_presence(self, channel_id: str) -> None:
        """Write the channel's waiting joins and leaves to its live
        per-channel sockets, one chunk per socket."""
        batch = self._batches.pop(channel_id, None)
        members = self.by_channel.get(channel_id)
        if batch is None or not members:
            return
        shared = batch.frames[0] if len(batch.frames) == 1 else b"".join(batch.frames)
        excluded = {user for user in batch.excluded if user}
        late = batch.late
        own: dict[tuple[str, int], tuple[bytes, list[str]]] = {}
        shared_written = 0
        written: list[str] = []  # frame types written to members with a chunk of their own
        dropped: list[str] = []
        metrics, limits = self.metrics, self.limits
        for conn in members.values():
            if conn.multiplexed:
                continue
            waiting = conn.state is State.JOINING and conn.answered
            if not (waiting or conn.state is State.LIVE or conn.state is State.SYNCING):
                continue
            user_id = conn.identity.user_id
            start = late.get(conn.id, 0) if late else 0
            if start or user_id in excluded:
                key = (user_id if user_id in excluded else "", start)
                chunk, types = own.get(key) or own.setdefault(key, _share(batch, *key))
                if not types:
                    continue
            else:
                chunk, types = shared, batch.types
            if waiting:
                self._keep_presence(conn, chunk)
            elif conn.write(chunk, metrics, limits, ephemeral=batch.ephemeral):
                if chunk is shared:
                    shared_written += 1
                else:
                    written.extend(types)
            else:
                dropped.extend(types)
        for frame_type in set(batch.types):
            count = batch.types.count(frame_type) * shared_written + written.count(frame_type)
            if count:
                metrics.frames_out_for(frame_type).inc(count)
            lost = dropped.count(frame_type)
            if lost:
                metrics.dropped_frames.labels(frame_type).inc(lost)

    def _write_diff(self, channel_id: str, frame_for: Callable[[str], bytes | None]) -> None:
        members = self.by_channel.get(channel_id)
        if not members:
            return
        frames: dict[int, bytes] = {}
        written = 0
        for conn in members.values():
            if not conn.multiplexed:
                continue
            waiting = conn.state is State.JOINING and conn.answered
            if not (waiting or conn.state is State.LIVE or conn.state is State.SYNCING):
                continue
            payload = frame_for(conn.identity.user_id)
            if payload is None:
                continue
            frame = frames.get(id(payload))
            if frame is None:
                frame = frames[id(payload)] = text_frame(payload)
            if waiting:
                self._keep_presence(conn, frame)
            elif conn.write(frame, self.metrics, self.limits, ephemeral=True):
                written += 1
        if written:
            self.metrics.frames_out_for("presence_diff").inc(written)

    def hold(self, conn: Connection, seq: int, payload: bytes) -> None:
        if conn.state is State.CLOSED:
            return
        if conn.held is None:
            conn.held = []
        elif len(conn.held) >= self.limits.max_held:
            self.metrics.slow_consumer_closes.inc()
            conn.close(wire.CLOSE_TRY_AGAIN, "too far behind")
            return
        conn.held.append((seq, payload))

    def release_held(self, conn: Connection) -> bool:
        """Write held frames that continue the cursor; return False on a gap."""
        if not conn.held:
            return True
        conn.held.sort(key=lambda item: item[0])
        rest: list[tuple[int, bytes]] = []
        for i, (seq, payload) in enumerate(conn.held):
            if seq <= conn.cursor:
                continue
            if seq != conn.cursor + 1:
                rest = conn.held[i:]
                break
            conn.send(payload, self.metrics, self.limits, "message")
            conn.cursor = seq
        conn.held = rest or None
        return not rest

    def answered(self, conn_id: int) -> None:
        """The owner's JoinResult for ``conn_id`` arrived, ahead of anything
        the owner sent after it: its ``initial_state`` covers the joins and
        leaves before this point, and those after are for the connection,
        even if they come before it goes live (``activate``)."""
        conn = self.by_id.get(conn_id)
        if conn is None or conn.state is not State.JOINING or conn.answered:
            return
        conn.answered = True
        batch = self._batches.get(conn.channel_id)
        if batch is not None and not conn.multiplexed:
            batch.late[conn.id] = len(batch.frames)

    def _keep_presence(self, conn: Connection, frame: bytes) -> None:
        """A join or leave after ``conn``'s initial_state, for when it goes live."""
        if conn.presence_held is None:
            conn.presence_held = []
        if len(conn.presence_held) < self.limits.max_held:
            conn.presence_held.append(frame)

    def activate(self, conn: Connection) -> None:
        """The socket is open and `initial_state` went out: go live."""
        if conn.state is State.CLOSED:
            return
        batch = self._batches.get(conn.channel_id)
        if batch is not None and not conn.answered:
            # Joins and leaves from before its initial_state are not for it.
            batch.late[conn.id] = len(batch.frames)
        conn.state = State.LIVE
        kept, conn.presence_held = conn.presence_held, None
        for frame in kept or ():
            conn.write(frame, self.metrics, self.limits, ephemeral=True)
        if not self.release_held(conn):
            conn.state = State.SYNCING
            self.on_gap(conn)

    def rejoined(self, conn: Connection, last_seq: int) -> None:
        """The owner re-registered ``conn`` after a stream break; catch up if it moved on."""
        if conn.state is State.LIVE and last_seq > conn.cursor:
            conn.state = State.SYNCING
            self.on_gap(conn)

    def reply(self, r: channel_pb2.Reply, frame_type: str) -> None:
        conn = self.by_id.get(r.conn_id)
        if conn is not None:
            conn.send(r.payload, self.metrics, self.limits, frame_type)


def _share(batch: _PresenceBatch, user_id: str, start: int) -> tuple[bytes, list[str]]:
    """The frames (and their types) from ``start`` on, except those not meant
    for ``user_id``."""
    keep = [i for i in range(start, len(batch.frames)) if batch.excluded[i] != user_id]
    return b"".join(batch.frames[i] for i in keep), [batch.types[i] for i in keep]
