"""The multiplexed endpoint (protocol v1.1): ``GET /websocket``, one socket
for all of a user's channels.

The socket is authenticated once; no channel is joined until the client
sends ``subscribe``. Each subscription is an ordinary ``Connection`` (its
own delivery cursor, replay and shard registration) that shares the
socket's writer, and a frame about a channel goes to that channel's
subscription. A channel is subscribed once its ``initial_state`` went out;
until then, and after ``unsubscribe``, frames for it are answered
``not_subscribed``. What v1 refuses before the upgrade is an ``error``
frame here, naming the channel. Budgets (frames, messages, typing, abuse)
are per socket, as on v1; closing the socket (a policy close, a slow
consumer, an expired token) ends every subscription.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from edge import frames, joining, protocol
from edge.auth import Identity
from edge.connection import Connection, State
from edge.heartbeat import Heartbeat
from edge.limits import ConnectionBudget
from edge.runtime import EdgeRuntime
from edge.upgraded import EdgeSocket
from waddle_common import wire

log = logging.getLogger("edge.mux")

# Refusals at subscribe time: which error a client gets, and when to retry.
_REFUSED: dict[str, tuple[wire.ErrorKind, int | None]] = {
    "channel_full": (wire.CHANNEL_FULL, 5000),
    "user_limit": (wire.USER_LIMIT, 5000),
    "unavailable": (wire.UNAVAILABLE, 1000),
}


@dataclass(eq=False)
class MuxSocket:
    """One multiplexed socket (the session of its ``EdgeSocket``): its user,
    its subscriptions and a control connection that carries the frames
    about no channel (pong, errors)."""

    id: int
    identity: Identity
    control: Connection
    runtime: EdgeRuntime
    heartbeat: Heartbeat
    sock: EdgeSocket
    subs: dict[str, Connection] = field(default_factory=dict)
    joins: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # Made on the first frame: a silent socket costs none.
    budget: ConnectionBudget | None = None

    @property
    def state(self) -> State:
        return self.control.state

    def close(self, code: int, reason: str) -> None:
        self.control.close(code, reason)

    def _budget(self) -> ConnectionBudget:
        if self.budget is None:
            self.budget = frames.first_budget(self.runtime)
        return self.budget

    def on_text(self, text: str) -> bool:
        if self.control.state is State.CLOSED:
            return False
        return on_frame(self.runtime, self, self._budget(), text)

    def on_binary(self) -> bool:
        if self.control.state is State.CLOSED:
            return False
        return frames.refuse_binary(self.runtime, self.control, self._budget())

    def on_closed(self, code: int | None) -> None:
        runtime = self.runtime
        runtime.sockets -= 1
        self.heartbeat.discard(self.sock)
        self.control.state = State.CLOSED
        for task in list(self.joins.values()):
            task.cancel()
        for conn in self.subs.values():
            _detach(runtime, conn)
        self.subs.clear()
        runtime.local.release_user(self.identity.user_id)
        runtime.mux_controls.discard(self.control)
        log.info(
            "disconnected",
            extra={"user_id": self.identity.user_id, "close_code": code},
        )


def _subscribed(sock: MuxSocket, channel_id: str) -> Connection | None:
    conn = sock.subs.get(channel_id)
    if conn is None or channel_id in sock.joins or conn.state is State.CLOSED:
        return None
    return conn


def _channel_error(
    runtime: EdgeRuntime, sock: MuxSocket, channel_id: str, kind: wire.ErrorKind, **extra: Any
) -> None:
    sock.control.send(
        wire.error_frame(kind, channel_id=channel_id, **extra),
        runtime.metrics,
        runtime.local.limits,
        "error",
    )


def subscribe(
    runtime: EdgeRuntime, sock: MuxSocket, channel_id: str, frame: protocol.Subscribe
) -> None:
    settings = runtime.settings
    if channel_id in sock.subs:
        _channel_error(runtime, sock, channel_id, wire.ALREADY_SUBSCRIBED)
        return
    if not sock.identity.may_join(channel_id):
        runtime.metrics.refusals.labels("forbidden").inc()
        _channel_error(runtime, sock, channel_id, wire.FORBIDDEN)
        return
    if runtime.draining:
        _channel_error(runtime, sock, channel_id, wire.UNAVAILABLE, retryAfterMs=1000)
        return
    if len(sock.subs) >= settings.max_subscriptions:
        _channel_error(runtime, sock, channel_id, wire.TOO_MANY_SUBSCRIPTIONS)
        return
    user_id = sock.identity.user_id
    if runtime.local.per_user.get(user_id, 0) >= settings.user_max_edge_connections:
        runtime.metrics.refusals.labels("user_edge_limit").inc()
        _channel_error(runtime, sock, channel_id, wire.USER_LIMIT, retryAfterMs=5000)
        return
    control = sock.control
    conn = Connection(
        id=next(runtime.conn_ids),
        channel_id=channel_id,
        identity=sock.identity,
        joined_at_ms=time.time_ns() // 1_000_000,
        status=control.status,
        ws=control.ws,
        transport=control.transport,
        multiplexed=True,
    )
    if frame.after_seq is not None:
        wait = runtime.replayer.admit(conn)
        if wait:
            _channel_error(
                runtime,
                sock,
                channel_id,
                wire.RATE_LIMITED,
                retryAfterMs=max(1, math.ceil(wait * 1000)),
            )
            return
    sock.subs[channel_id] = conn
    task = asyncio.create_task(_join(runtime, sock, conn, frame.after_seq))
    sock.joins[channel_id] = task


async def _join(
    runtime: EdgeRuntime, sock: MuxSocket, conn: Connection, after_seq: int | None
) -> None:
    channel_id = conn.channel_id
    link = runtime.router
    try:
        outcome = await joining.join(runtime, conn, link, resume=after_seq is not None)
    finally:
        sock.joins.pop(channel_id, None)
    if isinstance(outcome, str):
        if sock.subs.get(channel_id) is conn:
            del sock.subs[channel_id]
        kind, retry_ms = _REFUSED[outcome]
        runtime.metrics.refusals.labels(outcome).inc()
        _channel_error(runtime, sock, channel_id, kind, retryAfterMs=retry_ms)
        return
    conn.cursor = conn.floor = outcome.last_seq
    conn.send(outcome.initial_state, runtime.metrics, runtime.local.limits, "initial_state")
    runtime.local.activate(conn)
    if after_seq is not None:
        runtime.replayer.client_sync(conn, protocol.Sync(after_seq=after_seq), admitted=True)


def _detach(runtime: EdgeRuntime, conn: Connection) -> None:
    """End one subscription without closing the socket."""
    conn.state = State.CLOSED
    runtime.router.leave(conn)
    runtime.local.remove(conn)
    if conn.sync_task is not None:
        conn.sync_task.cancel()


def unsubscribe(runtime: EdgeRuntime, sock: MuxSocket, channel_id: str) -> None:
    conn = sock.subs.pop(channel_id, None)
    if conn is None:
        _channel_error(runtime, sock, channel_id, wire.NOT_SUBSCRIBED)
        return
    task = sock.joins.pop(channel_id, None)
    if task is not None:
        task.cancel()  # the join undoes itself
    else:
        _detach(runtime, conn)
    sock.control.send(
        wire.unsubscribed_frame(channel_id), runtime.metrics, runtime.local.limits, "unsubscribed"
    )


def on_frame(runtime: EdgeRuntime, sock: MuxSocket, budget: ConnectionBudget, text: str) -> bool:
    """Handle one client text frame; return False when the socket must end."""
    control, metrics = sock.control, runtime.metrics
    try:
        channel_id, frame = protocol.parse_frame(
            text, max_message_length=runtime.settings.max_message_length, multiplexed=True
        )
    except protocol.ProtocolError as exc:
        metrics.frames_in.labels("invalid").inc()
        return frames.refuse_frame(runtime, control, budget, exc.frame())
    refused = frames.take_frame(runtime, control, budget, frame, channel_id)
    if refused is not None:
        return refused
    if channel_id is None:  # ping, the one frame about no channel
        control.send(wire.PONG_FRAME, metrics, runtime.local.limits, "pong")
        return True
    match frame:
        case protocol.Subscribe():
            subscribe(runtime, sock, channel_id, frame)
        case protocol.Unsubscribe():
            unsubscribe(runtime, sock, channel_id)
        case _:
            conn = _subscribed(sock, channel_id)
            if conn is None:
                _channel_error(runtime, sock, channel_id, wire.NOT_SUBSCRIBED)
                return True
            if isinstance(frame, protocol.SetPresence):
                control.status = frame.status  # later subscriptions start with it
            link = runtime.router
            return frames.channel_frame(runtime, conn, link, budget, frame)
    return True


def open_socket(
    runtime: EdgeRuntime, sock: EdgeSocket, identity: Identity, heartbeat: Heartbeat
) -> MuxSocket:
    """The session of an upgraded multiplexed socket."""
    control = Connection(
        id=next(runtime.conn_ids),
        channel_id="",
        identity=identity,
        joined_at_ms=time.time_ns() // 1_000_000,
        state=State.LIVE,
        ws=sock,
        transport=sock.transport,
        cork=runtime.local.cork,
    )
    session = MuxSocket(
        id=control.id,
        identity=identity,
        control=control,
        runtime=runtime,
        heartbeat=heartbeat,
        sock=sock,
    )
    runtime.expiry.watch(session)
    runtime.local.hold_user(identity.user_id)
    runtime.mux_controls.add(control)
    return session
